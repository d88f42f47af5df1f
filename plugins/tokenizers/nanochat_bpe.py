"""nanochat's BPE tokenizer (RustBPE trained, tiktoken at inference; docs/architecture.md §1.10) plus ``<|image|>``.

The same interface as ByteTokenizer: vocab_size, bos_id, eos_id, image_id, pad_id, special_id(name),
encode(text), decode(ids).

- The base vocabulary is the tiktoken Encoding's (65536 for the Oct-2025 d20, 32768 for nanochat's 2026 models:
  the BPE ranks, then nanochat's 9 special tokens in the last 9 ids). ``<|image|>`` is appended as a new id equal
  to the base size (65536 or 32768), so ``vocab_size`` is one more than the checkpoint's and the decoder grows by
  one id (nanochat_pretrained; docs/architecture.md §1.10).
- bos = ``<|bos|>``; eos = ``<|assistant_end|>`` (nanochat's chat ends a turn there and its Engine stops on
  it); pad = ``<|assistant_end|>`` too, as nanochat's SFT pads its inputs (padded targets are -1 anyway).
- encode = tiktoken's ``encode_ordinary``: special-token text is NOT parsed ("<|bos|>" is ordinary text);
  decode skips the special ids.

Loading (``path``: a file or nanochat's tokenizer folder), safe by default:
- the vlmkit JSON export (``tokenizer_bpe.json``): pattern, mergeable ranks (base64 bytes -> rank) and
  special tokens, plain data. ``export_tokenizer(pkl, out)`` writes it from nanochat's ``tokenizer.pkl``,
  or from the shell: ``python -m plugins.tokenizers.nanochat_bpe tokenizer.pkl tokenizer_bpe.json``.
- ``tokenizer.pkl`` itself (nanochat's file as it is, read directly) only with ``allow_pickle: true``:
  unpickling runs whatever code the file names.
Needs the optional dependency ``tiktoken``.
"""
import base64
import json
import os
import sys

from core import hookimpl
from core.errors import ConfigError, cli_main

FORMAT = "vlmkit-tiktoken-bpe"
EXPORT_NAME = "tokenizer_bpe.json"
PICKLE_NAME = "tokenizer.pkl"
NANOCHAT_SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
IMAGE_TOKEN = "<|image|>"


def _tiktoken():
    try:
        import tiktoken
    except ImportError as e:
        raise ConfigError("tokenizer nanochat_bpe needs tiktoken: pip install tiktoken "
                          "(or pip install 'vlmkit[nanochat]')") from e
    return tiktoken


def _unpickle(path):
    """nanochat's tokenizer.pkl: a pickled tiktoken.Encoding. Unpickling can run code: callers opt in."""
    tiktoken = _tiktoken()
    import pickle
    try:
        with open(path, "rb") as f:
            enc = pickle.load(f)
    except Exception as e:  # truncated, not a pickle, a class that does not import
        raise ConfigError(f"tokenizer nanochat_bpe: cannot unpickle {path} ({type(e).__name__}: {e})") from e
    if not isinstance(enc, tiktoken.Encoding):
        raise ConfigError(f"tokenizer nanochat_bpe: {path} holds a {type(enc).__name__}, not a tiktoken.Encoding")
    return enc


def encoding_data(enc):
    """The plain data of a tiktoken Encoding: name, pattern, mergeable ranks, special tokens."""
    state = enc.__getstate__()  # tiktoken's own pickling state: these four fields
    if not isinstance(state, dict):  # a registered encoding pickles by name
        state = dict(name=enc.name, pat_str=getattr(enc, "_pat_str", None),
                     mergeable_ranks=getattr(enc, "_mergeable_ranks", None),
                     special_tokens=getattr(enc, "_special_tokens", None))
    if any(state.get(k) is None for k in ("pat_str", "mergeable_ranks", "special_tokens")):
        raise ConfigError("tokenizer nanochat_bpe: cannot read this tiktoken Encoding's pattern, ranks and "
                          "special tokens (tiktoken version?)")
    return dict(name=state["name"], pat_str=state["pat_str"], mergeable_ranks=state["mergeable_ranks"],
                special_tokens=state["special_tokens"])


def export_tokenizer(pkl_path, out_path):
    """Unpickle nanochat's tokenizer.pkl (trust it: this runs its code) and write the safe JSON export."""
    data = encoding_data(_unpickle(os.path.expanduser(pkl_path)))
    doc = {
        "format": FORMAT,
        "version": 1,
        "name": data["name"],
        "pattern": data["pat_str"],
        "special_tokens": dict(sorted(data["special_tokens"].items(), key=lambda kv: kv[1])),
        "mergeable_ranks": {base64.b64encode(b).decode("ascii"): r
                            for b, r in sorted(data["mergeable_ranks"].items(), key=lambda kv: kv[1])},
    }
    out_path = os.path.expanduser(out_path)
    tmp = f"{out_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=True)
    os.replace(tmp, out_path)
    return out_path


def _read_export(path):
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":
        raise ConfigError(f"tokenizer nanochat_bpe: {path} is a pickle, not vlmkit's JSON export; set "
                          f"allow_pickle: true to unpickle it (this runs code from the file) or export it first")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        ranks = {base64.b64decode(k, validate=True): int(v) for k, v in doc["mergeable_ranks"].items()}
        return dict(name=doc.get("name", "rustbpe"), pat_str=doc["pattern"], mergeable_ranks=ranks,
                    special_tokens={str(k): int(v) for k, v in doc["special_tokens"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"tokenizer nanochat_bpe: {path} is not a readable vlmkit tokenizer export ({e})") from e


def _building_on_meta():
    """True inside ``with torch.device("meta")``: a dry run, or core.generate rebuilding a checkpoint's model."""
    import torch
    return torch.empty(()).is_meta


class NanochatBPETokenizer:
    """nanochat's tiktoken BPE with ``<|image|>`` appended; see the module docstring.

    ``vocab_size``: the base vocabulary's size (65536 for d20), optional. It is checked against the file;
    and while the model is built on the meta device (``--dry-run``) a missing file is then no error: the
    tokenizer takes its ids from the size (nanochat's 9 specials are the last 9 ids, ``<|image|>`` the
    next), so the dry run shows the real decoder; encoding or decoding text says the file is missing.
    """

    def __init__(self, path, allow_pickle=False, vocab_size=None):
        path = os.path.expanduser(str(path))
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= len(NANOCHAT_SPECIALS)):
            raise ConfigError(f"vocab_size: expected the base vocabulary's size (65536 for d20), not {vocab_size!r}")
        if vocab_size is not None and not os.path.exists(path) and _building_on_meta():
            self._sized(path, vocab_size)
            return
        tiktoken = _tiktoken()
        if os.path.isdir(path):
            export, pkl = os.path.join(path, EXPORT_NAME), os.path.join(path, PICKLE_NAME)
            if os.path.isfile(export):
                path = export
            elif os.path.isfile(pkl):
                path = pkl
            else:
                raise ConfigError(f"tokenizer nanochat_bpe: {path} has neither {EXPORT_NAME} nor {PICKLE_NAME}")
        elif not os.path.isfile(path):
            raise ConfigError(f"tokenizer nanochat_bpe: {path} does not exist")
        if path.endswith(".pkl"):
            if not allow_pickle:
                raise ConfigError(f"tokenizer nanochat_bpe: {path} is a pickle and unpickling runs code from the "
                                  f"file; set allow_pickle: true if you trust it, or convert it once with "
                                  f"python -m plugins.tokenizers.nanochat_bpe {path} {EXPORT_NAME}")
            data = encoding_data(_unpickle(path))
        else:
            data = _read_export(path)
        self.path = path
        base_specials = dict(data["special_tokens"])
        try:
            # the Encoding itself knows only the base specials; encode never parses them, decode skips them
            self._enc = tiktoken.Encoding(data["name"], pat_str=data["pat_str"],
                                          mergeable_ranks=data["mergeable_ranks"], special_tokens=base_specials)
        except Exception as e:
            raise ConfigError(f"tokenizer nanochat_bpe: {path}: tiktoken refused the encoding ({e})") from e
        self.base_vocab_size = self._enc.n_vocab  # 65536 for d20: what the checkpoint was trained with
        if vocab_size is not None and vocab_size != self.base_vocab_size:
            raise ConfigError(f"vocab_size: {vocab_size} in the recipe but {path} has {self.base_vocab_size}")
        self._special = dict(base_specials)
        if IMAGE_TOKEN not in self._special:
            self._special[IMAGE_TOKEN] = self.base_vocab_size
        self.vocab_size = max(self.base_vocab_size, max(self._special.values()) + 1)
        for name in ("<|bos|>", "<|assistant_end|>"):
            if name not in self._special:
                raise ConfigError(f"tokenizer nanochat_bpe: {path} has no {name} special token; "
                                  f"it has {', '.join(self._special)}")
        self._special_ids = frozenset(self._special.values())
        self.bos_id = self._special["<|bos|>"]
        self.eos_id = self._special["<|assistant_end|>"]
        self.image_id = self._special[IMAGE_TOKEN]
        self.pad_id = self.eos_id  # nanochat's SFT pads with <|assistant_end|> (§1.10)

    def _sized(self, path, vocab_size):
        """A dry run's tokenizer without its file: ids from the size alone (see the class docstring)."""
        from core.distributed import print0
        print0(f"tokenizer nanochat_bpe: {path} does not exist; the dry run takes the vocabulary from vocab_size "
               f"{vocab_size} (+ <|image|>); training and reading need the file")
        self.path, self._enc, self.base_vocab_size = path, None, vocab_size
        first = vocab_size - len(NANOCHAT_SPECIALS)
        self._special = {name: first + i for i, name in enumerate(NANOCHAT_SPECIALS)}
        self._special[IMAGE_TOKEN] = vocab_size
        self.vocab_size = vocab_size + 1
        self._special_ids = frozenset(self._special.values())
        self.bos_id, self.eos_id = self._special["<|bos|>"], self._special["<|assistant_end|>"]
        self.image_id, self.pad_id = vocab_size, self.eos_id

    def _missing(self):
        return ConfigError(f"tokenizer nanochat_bpe: {self.path} does not exist (the dry run sized the vocabulary "
                           f"from vocab_size {self.base_vocab_size}); text needs the tokenizer file")

    def special_id(self, name):
        if name not in self._special:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(self._special)}")
        return self._special[name]

    def encode(self, text):
        if self._enc is None:
            raise self._missing()
        return self._enc.encode_ordinary(text)  # "<|bos|>" in the text is ordinary text

    def decode(self, ids):
        if self._enc is None:
            raise self._missing()
        keep = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i not in self._special_ids:
                keep.append(i)
        return self._enc.decode(keep, errors="replace")  # a cut-off UTF-8 sequence becomes U+FFFD


@hookimpl
def vlmkit_register(registry):
    registry.add("tokenizer", "nanochat_bpe", NanochatBPETokenizer)


def command(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise ConfigError("usage: python -m plugins.tokenizers.nanochat_bpe TOKENIZER.pkl OUT.json  "
                          "(unpickles the file: run it only on a tokenizer you trust)")
    print(f"wrote {export_tokenizer(argv[0], argv[1])}")


if __name__ == "__main__":
    sys.exit(cli_main(command))
