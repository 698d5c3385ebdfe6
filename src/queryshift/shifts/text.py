"""The 16 MM_Robustness text corruptions: 6 character-, 5 word- and 5 sentence-level.

Levels. Character- and word-level corruptions take a level 1-7 that sets the rate 0.05 * level (fraction of
words for nlpaug's ``aug_word_p`` and EDA's alpha / deletion probability). Sentence-level ones have the
single level 1.

Randomness. nlpaug draws from python ``random`` and the global ``np.random``. Each call therefore seeds both
from the query's own Generator, under a process-wide lock, and restores the previous global states
afterwards, so the output depends only on (seed, query index) and nothing else in the process is disturbed.
EDA and punctuation insertion are our own code on the Generator directly, and the seq2seq models sample under
``torch.random.fork_rng`` seeded the same way.

EDA (sr, ri, rs, rd) follows Wei & Zou's semantics: n = max(1, int(0.05 level * #words)) operations, output
normalised to lowercase a-z words. Where EDA picked from a Python ``set`` (arbitrary, hash-seed dependent
order), we pick uniformly from the sorted synonym list instead, which keeps runs repeatable. Synonyms come
from WordNet 3.0 read straight from Debian's ``wordnet-base`` files (no nltk download). ``ip`` inserts
punctuation into the raw caption (no normalisation), as AEDA does; note that the loaders' ``pre_caption``
later strips ``. ! ; :`` again, so only ``,`` and ``?`` survive to the model, exactly as with the released
benchmark files.

Semantic filter (off by default, like nothing in the char-level set): MM_Robustness redrew EDA, ip and
style outputs up to 100 times until the SentenceTransformer ``paraphrase-mpnet-base-v2`` cosine similarity to
the original was >= 0.9, keeping the last draw otherwise. ``semantic_filter=True`` does the same.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import threading
from functools import lru_cache

import numpy as np

from . import QueryShift

CHAR_CORRUPTIONS = ("KeyboardAug", "OcrAug", "RandomCharAug_insert", "RandomCharAug_substitute",
                    "RandomCharAug_swap", "RandomCharAug_delete")
WORD_CORRUPTIONS = ("sr", "ri", "rs", "rd", "ip")
SENTENCE_CORRUPTIONS = ("formal", "casual", "passive", "active", "back_trans")
TEXT_CORRUPTIONS = CHAR_CORRUPTIONS + WORD_CORRUPTIONS + SENTENCE_CORRUPTIONS
LEVELS = range(1, 8)

WORDNET_DIRS = ("/usr/share/wordnet",)
SIMILARITY_MODEL = "sentence-transformers/paraphrase-mpnet-base-v2"
STYLE_MODELS = {  # Styleformer's checkpoints and prompt prefixes
    "formal": ("prithivida/informal_to_formal_styletransfer", "transfer Casual to Formal: "),
    "casual": ("prithivida/formal_to_informal_styletransfer", "transfer Formal to Casual: "),
    "passive": ("prithivida/active_to_passive_styletransfer", "transfer Active to Passive: "),
    "active": ("prithivida/passive_to_active_styletransfer", "transfer Passive to Active: "),
}
ADEQUACY_MODEL = "prithivida/parrot_adequacy_model"  # Styleformer ranks formal/casual candidates with it
BACK_TRANSLATION_MODELS = ("facebook/wmt19-en-de", "facebook/wmt19-de-en")

_GLOBAL_RNG_LOCK = threading.Lock()


class MissingResource(ImportError):
    """A model checkpoint, data file or package the corruption needs is not available here."""


def _seed_from(rng: np.random.Generator) -> int:
    return int(rng.integers(2**32))


# -- character level (nlpaug) -----------------------------------------------------------------------------

def _nlpaug_augmenter(name: str, rate: float):
    try:
        import nlpaug.augmenter.char as nac
    except ImportError as err:
        raise MissingResource(f"{name} needs nlpaug: pip install 'nlpaug>=1.1.11' (queryshift[corrupt])") from err
    if name == "KeyboardAug":
        return nac.KeyboardAug(aug_word_p=rate)
    if name == "OcrAug":
        return nac.OcrAug(aug_word_p=rate)
    return nac.RandomCharAug(action=name.split("_", 1)[1], aug_word_p=rate)


def _run_seeded(fn, text: str, rng: np.random.Generator):
    """Call an nlpaug augmenter with the global RNGs seeded from ``rng``, then put them back."""
    seed = _seed_from(rng)
    with _GLOBAL_RNG_LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return fn(text)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# -- WordNet ------------------------------------------------------------------------------------------------

class WordNet:
    """Synonym lookup on the WordNet 3.0 database files (``index.*``, ``data.*``, ``*.exc``).

    Lemmatisation follows WordNet's morphy (exception lists, then suffix rules), as nltk's ``synsets`` does.
    """

    POS = ("noun", "verb", "adj", "adv")
    SUFFIX_RULES = {
        "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                 ("men", "man"), ("ies", "y")),
        "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                 ("ing", "")),
        "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
        "adv": (),
    }

    def __init__(self, root: str | None = None):
        root = root or find_wordnet()
        self.root = root
        self.index: dict[str, dict[str, tuple[int, ...]]] = {}
        self.exceptions: dict[str, dict[str, list[str]]] = {}
        self.data: dict[str, mmap.mmap | bytes] = {}
        for pos in self.POS:
            self.index[pos] = self._read_index(os.path.join(root, f"index.{pos}"))
            self.exceptions[pos] = self._read_exceptions(os.path.join(root, f"{pos}.exc"))
            path = os.path.join(root, f"data.{pos}")
            with open(path, "rb") as f:  # mapped, not read: worker processes share the pages
                self.data[pos] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) \
                    else b""
        self.synonyms = lru_cache(maxsize=65536)(self._synonyms)

    @staticmethod
    def _read_index(path):
        index = {}
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith(" "):  # licence header
                    continue
                fields = line.split()
                n_synsets = int(fields[2])
                index[fields[0]] = tuple(int(o) for o in fields[-n_synsets:])
        return index

    @staticmethod
    def _read_exceptions(path):
        table: dict[str, list[str]] = {}
        if os.path.exists(path):
            with open(path, encoding="latin-1") as f:
                for line in f:
                    inflected, *bases = line.split()
                    table.setdefault(inflected, []).extend(bases)
        return table

    def _lemmas(self, word: str, pos: str) -> list[str]:
        forms = [word] + self.exceptions[pos].get(word, [])
        if word not in self.exceptions[pos]:
            forms += [word[: -len(old)] + new for old, new in self.SUFFIX_RULES[pos] if word.endswith(old)]
        return list(dict.fromkeys(f for f in forms if f in self.index[pos]))

    def _synset_words(self, pos: str, offset: int) -> list[str]:
        data = self.data[pos]
        end = data.find(b"\n", offset)
        fields = data[offset:end].decode("latin-1").split()
        n_words = int(fields[3], 16)
        return [re.sub(r"\([a-z]+\)$", "", w) for w in fields[4:4 + 2 * n_words:2]]

    def _synonyms(self, word: str) -> tuple[str, ...]:
        """Lemma names of every synset of ``word`` (any part of speech), cleaned as EDA does."""
        key = word.lower().replace(" ", "_")
        found = set()
        for pos in self.POS:
            for lemma in self._lemmas(key, pos):
                for offset in self.index[pos][lemma]:
                    for name in self._synset_words(pos, offset):
                        clean = re.sub(r"[^a-z ]", "", name.replace("_", " ").replace("-", " ").lower())
                        clean = " ".join(clean.split())
                        if clean:
                            found.add(clean)
        found.discard(word)
        return tuple(sorted(found))


def find_wordnet() -> str:
    candidates = ([os.environ["WNSEARCHDIR"]] if os.environ.get("WNSEARCHDIR") else []) + list(WORDNET_DIRS)
    for root in candidates:
        if os.path.exists(os.path.join(root, "index.noun")) and os.path.exists(os.path.join(root, "data.noun")):
            return root
    raise MissingResource(
        f"WordNet data not found (looked in {', '.join(candidates)}); the sr/ri shifts need it: "
        "apt-get install wordnet-base (or point WNSEARCHDIR at a WordNet 3.0 dict directory)")


@lru_cache(maxsize=1)
def wordnet() -> WordNet:
    return WordNet()


# -- word level (EDA, AEDA) ---------------------------------------------------------------------------------

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
""".split())
PUNCTUATION = (".", ",", "!", "?", ";", ":")


def normalise(sentence: str) -> str:
    """EDA's cleaning: lowercase a-z words only, hyphens split, apostrophes dropped."""
    s = sentence.lower().replace("'", "").replace("\u2019", "").replace("-", " ")
    return " ".join(re.sub(r"[^a-z ]", " ", s.replace("\t", " ").replace("\n", " ")).split())


def synonym_replacement(words, n, rng, synonyms):
    candidates = [w for w in dict.fromkeys(words) if w not in STOPWORDS]
    replaced = 0
    for k in rng.permutation(len(candidates)):
        word = candidates[k]
        options = synonyms(word)
        if options:
            pick = options[rng.integers(len(options))]
            words = [pick if w == word else w for w in words]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(words).split()


def random_insertion(words, n, rng, synonyms):
    words = list(words)
    for _ in range(n):
        for _attempt in range(10):  # EDA gives up on this insertion after 10 words without synonyms
            options = synonyms(words[rng.integers(len(words))])
            if options:
                words.insert(int(rng.integers(len(words))), options[rng.integers(len(options))])
                break
    return " ".join(words).split()


def random_swap(words, n, rng):
    words = list(words)
    for _ in range(n):
        i = j = int(rng.integers(len(words)))
        for _attempt in range(4):  # EDA skips the swap after 3 redraws of the same index
            j = int(rng.integers(len(words)))
            if j != i:
                break
        if j != i:
            words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words, p, rng):
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [words[rng.integers(len(words))]]


def insert_punctuation(sentence: str, rate: float, rng) -> str:
    words = sentence.split(" ")
    q = int(rng.integers(1, int(rate * len(words) + 1) + 1))
    chosen = set(rng.choice(len(words), size=min(q, len(words)), replace=False).tolist())
    out = []
    for j, word in enumerate(words):
        if j in chosen:
            out.append(PUNCTUATION[rng.integers(len(PUNCTUATION))])
        out.append(word)
    return " ".join(out)


def eda(sentence: str, op: str, rate: float, rng: np.random.Generator, synonyms=None) -> str:
    words = normalise(sentence).split()
    if not words:
        return sentence
    n = max(1, int(rate * len(words)))
    if op == "sr":
        words = synonym_replacement(words, n, rng, synonyms or wordnet().synonyms)
    elif op == "ri":
        words = random_insertion(words, n, rng, synonyms or wordnet().synonyms)
    elif op == "rs":
        words = random_swap(words, n, rng)
    elif op == "rd":
        words = random_deletion(words, rate, rng)
    else:
        raise ValueError(f"unknown EDA operation {op!r}")
    return normalise(" ".join(words))


# -- models from the Hugging Face hub ---------------------------------------------------------------------

def _from_hub(loader, model_id: str, purpose: str):
    try:
        return loader.from_pretrained(model_id)
    except OSError as err:
        raise MissingResource(
            f"{purpose} needs the Hugging Face model {model_id!r}, which is not in the local cache and could "
            f"not be downloaded (offline?). Fetch it once with network access, e.g. "
            f"`huggingface-cli download {model_id}`, or set HF_HOME to a cache that has it. ({err})") from err


def _transformers(purpose: str):
    try:
        import transformers
    except ImportError as err:
        raise MissingResource(f"{purpose} needs transformers: pip install 'queryshift[hf]'") from err
    return transformers


class SemanticFilter:
    """Cosine similarity of SentenceTransformer embeddings (MM_Robustness's redraw criterion)."""

    def __init__(self, model_id: str = SIMILARITY_MODEL, threshold: float = 0.9, max_draws: int = 100):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise MissingResource("the semantic filter needs sentence-transformers: "
                                  "pip install sentence-transformers") from err
        try:
            self.model = SentenceTransformer(model_id)
        except (OSError, ValueError) as err:
            raise MissingResource(
                f"the semantic filter needs the model {model_id!r}, which is not cached and could not be "
                f"downloaded (offline?): `huggingface-cli download {model_id}` once with network access") from err
        self.threshold, self.max_draws = threshold, max_draws

    def similar(self, a: str, b: str) -> bool:
        ea, eb = self.model.encode([a, b], normalize_embeddings=True)
        return float(np.dot(ea, eb)) >= self.threshold

    def draw(self, original: str, make) -> str:
        out = original
        for _ in range(self.max_draws):
            out = make()
            if self.similar(out, original):
                break
        return out


class Seq2SeqStyle:
    """Styleformer's transfer: prefix + T5 sampling (top-k 50, top-p 0.95, 32 tokens)."""

    def __init__(self, style: str):
        tf = _transformers(style)
        model_id, self.prefix = STYLE_MODELS[style]
        self.tokenizer = _from_hub(tf.AutoTokenizer, model_id, style)
        self.model = _from_hub(tf.AutoModelForSeq2SeqLM, model_id, style).eval()
        self.candidates = 5 if style in ("formal", "casual") else 1
        self.adequacy = None
        if self.candidates > 1:
            self.adequacy_tokenizer = _from_hub(tf.AutoTokenizer, ADEQUACY_MODEL, style)
            self.adequacy = _from_hub(tf.AutoModelForSequenceClassification, ADEQUACY_MODEL, style).eval()

    def __call__(self, text: str, seed: int) -> str:
        import torch

        ids = self.tokenizer(self.prefix + text, return_tensors="pt").input_ids
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(ids, do_sample=True, max_length=32, top_k=50, top_p=0.95,
                                      num_return_sequences=self.candidates)
        outputs = list(dict.fromkeys(self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out))
        if self.adequacy is None:
            return outputs[0] or text
        with torch.no_grad():
            enc = self.adequacy_tokenizer([text] * len(outputs), outputs, return_tensors="pt", padding=True)
            scores = self.adequacy(**enc).logits.softmax(-1)[:, 1].tolist()
        ranked = sorted((s, o) for s, o in zip(scores, outputs) if s >= 0.95)
        return ranked[-1][1] if ranked else text  # MM_Robustness kept the caption when none passed


class BackTranslation:
    """English -> German -> English with the FSMT WMT19 models (nlpaug's BackTranslationAug setup)."""

    def __init__(self):
        tf = _transformers("back_trans")
        self.steps = [(_from_hub(tf.AutoTokenizer, m, "back_trans"),
                       _from_hub(tf.AutoModelForSeq2SeqLM, m, "back_trans").eval())
                      for m in BACK_TRANSLATION_MODELS]

    def __call__(self, text: str, seed: int) -> str:
        import torch

        with torch.no_grad():
            for tokenizer, model in self.steps:
                ids = tokenizer(text, return_tensors="pt")
                text = tokenizer.decode(model.generate(**ids)[0], skip_special_tokens=True).strip()
        return text


# -- the shift ------------------------------------------------------------------------------------------------

class TextCorruption(QueryShift):
    """One text corruption at one level, applied to every caption query (a str in, a str out)."""

    modality = "text"

    def __init__(self, corruption: str, level: int = 1, semantic_filter: bool = False):
        if corruption not in TEXT_CORRUPTIONS:
            raise ValueError(f"unknown text corruption {corruption!r}; choose from {', '.join(TEXT_CORRUPTIONS)}")
        allowed = (1,) if corruption in SENTENCE_CORRUPTIONS else LEVELS
        if level not in allowed:
            raise ValueError(f"{corruption}: level must be {'1' if len(allowed) == 1 else '1-7'}, got {level}")
        self.corruption, self.level, self.rate = corruption, level, 0.05 * level
        self.name = f"{corruption}:{level}"
        self.filter = SemanticFilter() if semantic_filter and corruption not in CHAR_CORRUPTIONS + (
            "back_trans",) else None
        self._augmenter = None
        if corruption in CHAR_CORRUPTIONS:
            self._augmenter = _nlpaug_augmenter(corruption, self.rate)
        elif corruption in ("sr", "ri"):
            wordnet()  # fail now, not on the first query, when the data is missing
        elif corruption in STYLE_MODELS:
            self._augmenter = Seq2SeqStyle(corruption)
        elif corruption == "back_trans":
            self._augmenter = BackTranslation()

    def _once(self, text: str, rng: np.random.Generator) -> str:
        c = self.corruption
        if c in CHAR_CORRUPTIONS:
            out = _run_seeded(self._augmenter.augment, text, rng)
            out = out[0] if isinstance(out, list) else out  # nlpaug >= 1.1.8 returns a list
            return out or text
        if c == "ip":
            return insert_punctuation(text, self.rate, rng)
        if c in WORD_CORRUPTIONS:
            return eda(text, c, self.rate, rng)
        return self._augmenter(text, _seed_from(rng)) or text

    def __call__(self, item, index, position, total, rng):
        if not item or not item.strip():
            return item
        if self.filter is not None:
            return self.filter.draw(item, lambda: self._once(item, rng))
        return self._once(item, rng)
