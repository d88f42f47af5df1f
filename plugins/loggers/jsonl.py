"""JSONL logger: one JSON object per event, appended to ``<run dir>/log.jsonl``."""
import json
import os

from core import hookimpl


class JsonlLogger:
    def __init__(self, run_dir, filename="log.jsonl"):
        self.path = os.path.join(run_dir, filename)

    @hookimpl
    def vlmkit_log(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


@hookimpl
def vlmkit_register(registry):
    registry.add("logger", "jsonl", JsonlLogger)
