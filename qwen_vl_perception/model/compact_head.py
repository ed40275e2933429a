"""The greedy pick over a vocabulary most of whose output rows are exactly zero.

The project's default model keeps the real 151,936-token Qwen3 tokenizer but trains only the
~100 embedding rows its prompt and answers use; every other row is zero, and with the tied
``lm_head`` those tokens' logits are exactly 0. A decode step on a CPU then spends most of its
time multiplying by, and normalising over, rows that contribute nothing. :class:`CompactHead`
computes the non-zero rows' logits only and takes the argmax and the softmax probability as
over the full vocabulary: the ``Z`` zero logits enter the normaliser as ``log(Z)`` and win the
argmax (the first of them, as ``torch.argmax`` would pick) when no other logit is above 0.
"""
import math
from typing import Optional

MIN_ZERO_FRACTION = 0.5
"""Below this share of zero rows the full head is as cheap: no compact head."""


class CompactHead:
    def __init__(self, torch, weight, used_ids, first_zero_id: int, zero_count: int):
        self.torch = torch
        self.weight = weight  # (used, hidden): the non-zero rows, in vocabulary order
        self.used_ids = used_ids
        self.first_zero_id = int(first_zero_id)
        self.log_zero_count = math.log(zero_count)

    @classmethod
    def for_head(cls, torch, lm_head) -> Optional['CompactHead']:
        """A compact head for ``lm_head`` (a plain ``nn.Linear`` without bias) if at least
        :data:`MIN_ZERO_FRACTION` of its rows are exactly zero; else None."""
        weight = getattr(lm_head, 'weight', None)
        if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None or weight is None:
            return None
        with torch.no_grad():
            nonzero = weight.detach().ne(0).any(dim=1)
            zero_count = int(nonzero.numel() - nonzero.sum())
            if zero_count < MIN_ZERO_FRACTION * nonzero.numel():
                return None
            used_ids = torch.nonzero(nonzero).flatten()
            first_zero_id = int(torch.nonzero(~nonzero)[0])
            return cls(torch, weight.detach()[used_ids].clone(), used_ids, first_zero_id,
                       zero_count)

    def best(self, hidden):
        """``(token ids, their probabilities)`` as ``argmax`` and ``softmax`` over the full
        vocabulary's logits would give them (fp32 statistics)."""
        torch = self.torch
        logits = torch.nn.functional.linear(hidden, self.weight).float()
        top, index = logits.max(dim=-1)
        best = self.used_ids[index]
        # Zero logits beat a negative best, and tie with a zero best where they come first.
        zero_wins = (top < 0) | ((top == 0) & (best > self.first_zero_id))
        best = torch.where(zero_wins, torch.full_like(best, self.first_zero_id), best)
        top = torch.where(zero_wins, torch.zeros_like(top), top)
        zeros = torch.full_like(top, self.log_zero_count).unsqueeze(-1)
        normaliser = torch.logsumexp(torch.cat([logits, zeros], dim=-1), dim=-1)
        return best, torch.exp(top - normaliser)
