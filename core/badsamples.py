"""Bad samples: why a sample was not used, counted by reason and shard, or the run stopped at the first.

Training skips what it cannot use and says so at the end of each stage (a small table of
reason, count, shard); ``data.on_bad_sample: error`` stops at the first bad sample instead, with
one line naming the shard, the sample key and the reason. A report is a plain dict
``{reason: {shard: count}}``, so it travels from DataLoader workers and into checkpoints as JSON.
"""
from core.errors import ConfigError

REASONS = {  # why a sample was not used (or, truncated_target, was used cut short)
    "truncated_shard": "the tar breaks off or is corrupt; the samples before the break were used",
    "unreadable_shard": "the shard cannot be opened, or its URL's command fails (detail: the command's error); "
                        "the samples read before the failure were used",
    "wrong_keys": "neither an image (png, jpg, jpeg, webp) nor a txt member",
    "missing_image": "no image member (png, jpg, jpeg, webp)",
    "missing_text": "no txt member",
    "bad_text": "the txt member is not UTF-8",
    "empty_text": "the txt member is empty or only whitespace (training only: an eval page may be empty)",
    "duplicate_key": "a member name repeats within a sample, or a key repeats after other samples in the shard",
    "empty_image": "the image member is empty (0 bytes or 0 pixels)",
    "image_too_large": "more pixels than data.max_image_pixels (decompression-bomb guard)",
    "bad_image": "the image does not decode",
    "long_target": "the text does not fit data.max_len; skipped (data.on_long_target: skip)",
    "long_image": "the prompt with the image's vision tokens (global view + crops) leaves no room in data.max_len",
    "truncated_target": "the text did not fit data.max_len and was cut (data.on_long_target: truncate); used",
    "text_only": "a sample without an image; text-only samples feed a stage's text_ratio from data.text_dataset",
    "image_sample": "a sample with an image in the text-only stream (data.text_dataset)",
    "bad_conversation": "the json conversation is malformed (turns, roles, <image> marker)",
    "bad_json": "the json member does not parse (or nests deeper than the parser's recursion limit)",
}
ON_BAD_SAMPLE = ("skip", "error")
ON_LONG_TARGET = ("truncate", "skip")
COUNTED_EVEN_IN_ERROR_MODE = ("long_target", "truncated_target")  # chosen by on_long_target, not faults


class BadSample(Exception):
    """One sample that cannot be used: ``reason`` is a key of REASONS, ``detail`` a short what-and-why."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, " ".join(str(detail).split())[:200]


def check_policy(key, value, options):
    """A ConfigError naming ``data.<key>`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ConfigError(f"data.{key}: expected {' or '.join(options)}, not {value!r}")


def count(report, reason, shard, n=1):
    by_shard = report.setdefault(reason, {})
    by_shard[shard] = by_shard.get(shard, 0) + n


def merge_reports(into, other):
    """Add ``other`` ({reason: {shard: count}}) into ``into``; returns ``into``."""
    for reason, by_shard in other.items():
        for shard, n in by_shard.items():
            count(into, reason, shard, n)
    return into


def handle(bad, raw, report, policy):
    """Count a bad sample, or stop the run (policy "error"; a chosen on_long_target: skip only counts)."""
    if policy == "error" and bad.reason not in COUNTED_EVEN_IN_ERROR_MODE:
        key = f", sample {raw['__key__']!r}" if raw.get("__key__") else ""
        detail = f" ({bad.detail})" if bad.detail else ""
        raise ConfigError(f"data: shard {raw['__url__']!r}{key}: {bad.reason}{detail} "
                          f"[data.on_bad_sample: error]")
    count(report, bad.reason, raw["__url__"])


def format_report(report, title):
    """The report as a short table: a title line with totals, then reason, count, shard per line."""
    used = sum(report.get("truncated_target", {}).values())
    skipped = sum(n for reason, by in report.items() if reason != "truncated_target" for n in by.values())
    parts = [f"{skipped} sample(s) skipped"] + ([f"{used} target(s) truncated"] if used else [])
    rows = sorted((reason, n, shard) for reason, by in report.items() for shard, n in by.items())
    width = max([len("reason")] + [len(r) for r, _, _ in rows])
    lines = [f"data report, {title}: {', '.join(parts)}", f"  {'reason':<{width}}  {'count':>6}  shard"]
    lines += [f"  {reason:<{width}}  {n:>6}  {shard}" for reason, n, shard in rows]
    return "\n".join(lines)
