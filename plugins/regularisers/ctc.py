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

``source`` may instead name a submodule whose output is a (B, C, h, w) map, read row by row: e.g.
``encoder.sam.neck``, SAM's map before the compressor. On a text strip with 32 x 4 patches that is one
frame sequence at 4 px per token while the decoder sees the compressed 8 px tokens: CTC leaves its
plateau sooner when each frame holds at most part of one glyph (README, "How the tiny default learns").
``blank_bias`` starts the blank's logit that much above the others: the head then begins near the
plateau every CTC run first has to reach (frames are mostly blank), instead of spending ~150 steps there.
"""
import torch
import torch.nn.functional as F
from torch import nn

from core import hookimpl


class CTCRegulariser(nn.Module):
    def __init__(self, model, tokenizer, weight=1.0, frames_per_token=2, source="vision_tokens", blank_bias=0.0):
        super().__init__()
        self.weight, self.frames = weight, frames_per_token
        self.tokenizer = tokenizer
        self.blank = tokenizer.vocab_size  # one extra class after the vocabulary
        self.source, self._captured = source, None
        channels = model.decoder.n_embd
        if source != "vision_tokens":
            try:
                module = model.get_submodule(source)
            except AttributeError:
                raise ValueError(f"source: the model has no module {source!r}") from None
            convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ValueError(f"source: {source!r} has no Conv2d to tell its channels; name a map-producing module")
            channels = convs[-1].out_channels
            # a hook, not a second forward: the map is the one this training step computes anyway.
            # Held by the model, not by this module, so it lives as long as this regulariser's model.
            module.register_forward_hook(self._capture)
        self.head = nn.Linear(channels, frames_per_token * (tokenizer.vocab_size + 1))
        if blank_bias:
            with torch.no_grad():
                self.head.bias.view(frames_per_token, -1)[:, self.blank] += blank_bias

    def _capture(self, module, inputs, output):
        self._captured = output

    def labels(self, texts, device):
        ids = [self.tokenizer.encode("".join(t.split())) for t in texts]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
        return flat.to(device), lengths

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        if outputs["vision_tokens"] is None:  # a text-only batch
            return None
        tokens = outputs["vision_tokens"]  # (B, N, C)
        if self.source != "vision_tokens":  # the hooked (B, C, h, w) map of this forward, row-major frames
            tokens = self._captured.flatten(2).transpose(1, 2)
            self._captured = None
        b, n, _ = tokens.shape
        logits = self.head(tokens).float().view(b, n * self.frames, self.blank + 1)
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, B, classes) as F.ctc_loss wants
        targets, target_lengths = self.labels(batch["texts"], tokens.device)
        input_lengths = torch.full((b,), n * self.frames, dtype=torch.long)
        loss = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=self.blank,
                          reduction="mean", zero_infinity=True)
        return {"ctc": self.weight * loss}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "ctc", CTCRegulariser)
