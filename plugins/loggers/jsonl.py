"""JSONL logger: one JSON object per event, appended to ``<run dir>/log.jsonl``."""
import json
import os

from core import hookimpl


class JsonlLogger:
    def __init__(self, run_dir, filename="log.jsonl"):
        self.path = os.path.join(run_dir, filename)
        # a killed run may have left half a line: a resumed run's records start on a line of their own
        if os.path.isfile(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    @hookimpl
    def vlmkit_log(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


@hookimpl
def vlmkit_register(registry):
    registry.add("logger", "jsonl", JsonlLogger)
