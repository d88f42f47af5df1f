"""CTC on the vision tokens: make the image features spell the answer, in reading order.

Why: with only the next-token loss a small decoder learns the text prior and
ignores the image (DESIGN.md, "Learning at tiny scale"); a CTC head on the
encoder side gives the vision tower a direct reading signal from the first
step. The head is used only in training and is saved with the stage.

The sequence is the decoder's vision tokens in layout order (grid rows, each
followed by its newline slot, then the separator). Each token emits
``frames_per_token`` CTC frames, so a token may carry two characters and a
doubled letter in adjacent tokens can still be aligned (CTC needs a blank
between repeats). The labels are the answer's tokens with whitespace removed:
space cells and row ends become blanks.

``source`` may instead name a submodule whose output is a (B, C, h, w) map, read row by row, or a list
of sources, each with its own head and loss term (``ctc`` for the vision tokens, ``ctc_<last name>``
for a module, e.g. ``ctc_neck``). ``encoder.sam.neck`` is SAM's map before the compressor: on a text
strip with 32 x 4 patches, one frame sequence at 4 px per token while the decoder sees the compressed
8 px tokens. CTC leaves its plateau sooner when each frame holds at most part of one glyph, and the
vision tokens need their own CTC term too, or CLIP above SAM gets no reading signal (docs/results.md,
"How the tiny default learns"). A module source is captured by a forward hook during the model's own forward;
with crops the encoder's last call is the tiles', so use it with the global view alone.
``blank_bias`` starts the blank's logit that much above the others: the head then begins near the
plateau every CTC run first has to reach (frames are mostly blank), instead of spending ~150 steps there.
"""
import torch
import torch.nn.functional as F
from torch import nn

from core import hookimpl

TOKENS = "vision_tokens"


class CTCRegulariser(nn.Module):
    def __init__(self, model, tokenizer, weight=1.0, frames_per_token=2, source=TOKENS, blank_bias=0.0):
        super().__init__()
        self.weight = weight
        self.tokenizer = tokenizer
        self.blank = tokenizer.vocab_size  # one extra class after the vocabulary
        self.sources = [source] if isinstance(source, str) else list(source)
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"source: one or more distinct sources, not {source!r}")
        # one count for every source, or one per source (4 px neck frames need fewer than 8 px tokens)
        frames = [frames_per_token] * len(self.sources) if isinstance(frames_per_token, int) else list(frames_per_token)
        if len(frames) != len(self.sources) or min(frames) < 1:
            raise ValueError(f"frames_per_token: a count >= 1, or one per source; not {frames_per_token!r}")
        self.frames_per_source = frames
        self.frames = frames[0]
        self.terms, channels = [], []
        for name in self.sources:
            if name == TOKENS:
                self.terms.append("ctc")
                channels.append(model.decoder.n_embd)
                continue
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"source: the model has no module {name!r}") from None
            convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ValueError(f"source: {name!r} has no Conv2d to tell its channels; name a map-producing module")
            self.terms.append(f"ctc_{name.rsplit('.', 1)[-1]}")
            channels.append(convs[-1].out_channels)
            # a hook, not a second forward: the map is the one this training step computes anyway
            module.register_forward_hook(self._capture(name))
        self._captured = {}
        heads = [nn.Linear(c, f * (tokenizer.vocab_size + 1)) for c, f in zip(channels, frames)]
        for head, f in zip(heads, frames):
            if blank_bias:
                with torch.no_grad():
                    head.bias.view(f, -1)[:, self.blank] += blank_bias
        if len(heads) == 1:
            self.head = heads[0]  # one source: the state_dict keys of earlier checkpoints (head.weight)
        else:
            self.heads = nn.ModuleList(heads)

    def _capture(self, name):
        def hook(module, inputs, output):
            self._captured[name] = output
        return hook

    def head_for(self, i):
        return self.head if len(self.sources) == 1 else self.heads[i]

    def frames_of(self, source, outputs):
        """(B, N, C) features of one source from this forward's outputs (a module's map: row-major)."""
        if source == TOKENS:
            return outputs["vision_tokens"]
        return self._captured.pop(source).flatten(2).transpose(1, 2)

    def labels(self, texts, device):
        ids = [self.tokenizer.encode("".join(t.split())) for t in texts]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
        return flat.to(device), lengths

    def loss(self, tokens, head, frames, texts):
        b, n, _ = tokens.shape
        logits = head(tokens).float().view(b, n * frames, self.blank + 1)
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, B, classes) as F.ctc_loss wants
        targets, target_lengths = self.labels(texts, tokens.device)
        input_lengths = torch.full((b,), n * frames, dtype=torch.long)
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=self.blank,
                          reduction="mean", zero_infinity=True)

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        if outputs["vision_tokens"] is None:  # a text-only batch
            return None
        return {term: self.weight * self.loss(self.frames_of(source, outputs), self.head_for(i),
                                              self.frames_per_source[i], batch["texts"])
                for i, (source, term) in enumerate(zip(self.sources, self.terms))}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "ctc", CTCRegulariser)
