"""Reports of continual streams: R@1 along the stream per method against ``source``, and the table that says
who gains, who forgets and where a method ends below the unadapted model.

Works on bench records (``{"labels": {...}, "segments": ..., "segment_order": ..., "forgetting": ...}``): the
runs of one stream are the records whose labels agree except for ``method``.
"""

from __future__ import annotations

from typing import Any

SOURCE = "source"


def _method(record: dict) -> str:
    return record.get("labels", {}).get("method") or record.get("method", "?")


def _stream_key(record: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in record.get("labels", {}).items() if k != "method"))


def _stream_label(key: tuple) -> str:
    return " ".join(v for _, v in key) or "stream"


def segment_r1(record: dict) -> list[tuple[str, float]]:
    """(segment, R@1) in stream order."""
    segments = record.get("segments") or {}
    order = record.get("segment_order") or list(segments)
    return [(s, segments[s]["r1"]) for s in order if s in segments]


def _dig(record: dict, path: str):
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def group_streams(records: list[dict]) -> dict[str, list[dict]]:
    """The records with stream segments, by stream: label (the labels other than ``method``) -> records."""
    streams: dict[tuple, list[dict]] = {}
    for record in records:
        if record.get("segments"):
            streams.setdefault(_stream_key(record), []).append(record)
    return {_stream_label(key): group for key, group in streams.items()}


def continual_summary(records: list[dict], source: str = SOURCE) -> dict[str, list[dict]]:
    """Per stream (label) the rows of its methods: stream R@1 (mean over segments), clean and general-domain
    forgetting after the stream, and the number of segments where the method's R@1 is below ``source``'s.

    Only records with segments take part; a stream without a ``source`` run has ``below_source`` None."""
    out = {}
    for label, group in group_streams(records).items():
        base = next((r for r in group if _method(r) == source), None)
        base_r1 = dict(segment_r1(base)) if base else None
        rows = []
        for record in group:
            seg = segment_r1(record)
            below = None if base_r1 is None else sum(1 for s, r1 in seg if s in base_r1 and r1 < base_r1[s])
            rows.append({
                "method": _method(record), "stream_r1": round(sum(r for _, r in seg) / len(seg), 2),
                "forgetting": _dig(record, "forgetting.forgetting"),
                "forgetting_general": _dig(record, "forgetting_general.mean.forgetting"),
                "below_source": below, "segments": len(seg),
            })
        out[label] = rows
    return out


def _cell(v) -> str:
    if v is None:
        return "—"
    return f"{v:+.2f}" if isinstance(v, float) else str(v)


def continual_table(rows: list[dict]) -> str:
    """A Markdown table of one stream's :func:`continual_summary` rows."""
    lines = ["| method | stream R@1 | clean forgetting | general forgetting | segments below source |",
             "|---|---|---|---|---|"]
    for r in rows:
        below = "—" if r["below_source"] is None else f"{r['below_source']} of {r['segments']}"
        lines.append(f"| {r['method']} | {r['stream_r1']:.2f} | {_cell(r['forgetting'])} | "
                     f"{_cell(r['forgetting_general'])} | {below} |")
    return "\n".join(lines)


def plot_continual(records: list[dict], title: str, path: str, source: str = SOURCE) -> None:
    """R@1 per segment along the stream, one line per method; ``source`` as a dashed black line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_segments = [r for r in records if r.get("segments")]
    if not with_segments:
        raise ValueError(f"{title}: no run with stream segments to plot")
    names = [s for s, _ in segment_r1(with_segments[0])]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(names) + 3), 4.6))
    for record in with_segments:
        values = dict(segment_r1(record))
        ys = [values.get(s) for s in names]
        if _method(record) == source:
            ax.plot(range(len(names)), ys, "k--", lw=2, label=source, zorder=5)
        else:
            ax.plot(range(len(names)), ys, marker="o", ms=3.5, lw=1.4, label=_method(record))
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_xlabel("segment (stream order, no reset)")
    ax.set_ylabel("R@1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
