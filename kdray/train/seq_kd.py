"""``scheme: seq_kd``: sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge Distillation",
EMNLP 2016): the student is trained on the teacher's own answers to the training prompts instead of the data's.

The teacher completes every training prompt greedily once (Kim & Rush use beam search; greedy is their beam of 1, and
what the teacher would serve); the rows become prompt + the teacher's answer up to and including its end token, the
targets those answer tokens. A sweep makes them once, before its trials (on a GPU node when the trials use GPUs), and
every trial reads them from Ray's object store; a run on its own (``kdray distill``, ``final``) makes them itself.
Token-level terms on these rows (``seq_kd+tkd``: Kim & Rush's word- plus sequence-level KD) score them with the live
teacher: the shared teacher-output cache holds the data's rows, not these. Validation and test keep the data's
answers: selection and ``final`` measure what the student gets right, not how well it imitates.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdray.data import Split
from kdray.knowledge.token import IGNORE
from kdray.models.generate import complete, completion_rows


@torch.no_grad()
def teacher_rows(teacher: nn.Module, split: Split, prompt_len: int, eos: int | None, pad: int = 0,
                 batch_size: int = 256, device: torch.device | None = None) -> dict[str, Tensor]:
    """The teacher's greedy answers to ``split``'s prompts as training rows: ``x`` (N, T) and ``y`` (N, T) (-100 on
    the prompt and after the teacher's end token), on the CPU, in the split's order."""
    device = device or torch.device("cpu")
    n_new = int(split.x.shape[1]) - prompt_len + 1
    xs, ys = [], []
    for a in range(0, len(split), batch_size):
        prompts = split.x[a:a + batch_size, :prompt_len].to(device)
        tokens, generated = complete(teacher, prompts, n_new, eos=eos, pad=pad)
        x, y = completion_rows(prompts, tokens, generated, IGNORE)
        xs.append(x.cpu())
        ys.append(y.cpu())
    return {"x": torch.cat(xs), "y": torch.cat(ys)}


def as_split(rows: dict[str, Tensor], prompt_len: int) -> Split:
    return Split(rows["y"], rows["x"], prompt_len=prompt_len)


__all__ = ["as_split", "teacher_rows"]
