"""Distillation losses.

- `divergences`: forward/reverse KL, JSD(beta) (scaled, continuous in beta), skew KL both ways, TVD,
  over two log-distributions on one support;
- `support`: the teacher's two forms (full logits, top-k) and the alignment of both sides onto
  the shared real vocabulary or the top-k + tail buckets;
- `token_loss`: the divergences on student logits, cross-entropy, `TokenLoss` (the configured mix),
  and the on-policy sampled-token reverse-KL estimator;
- `chunked`: the same loss from hidden states + lm_head without the full logits (the training default);
- `vocab`: checks that teacher and student tokenizers are one vocabulary up to padding.
"""

from distill.losses.chunked import chunked_loss, naive_loss
from distill.losses.support import (MISSING_MASS_POLICIES, FullTeacher, SampledTokenTeacher, TopKTeacher,
                                    aligned_log_probs)
from distill.losses.token_loss import (DIVERGENCES, TokenLoss, cross_entropy, forward_kl, jsd, reverse_kl,
                                       sampled_token_reverse_kl, skew_kl, skew_reverse_kl, token_divergence, tvd)

__all__ = ["DIVERGENCES", "MISSING_MASS_POLICIES", "FullTeacher", "SampledTokenTeacher", "TopKTeacher", "TokenLoss",
           "aligned_log_probs", "chunked_loss", "cross_entropy", "forward_kl", "jsd", "naive_loss", "reverse_kl",
           "sampled_token_reverse_kl", "skew_kl", "skew_reverse_kl", "token_divergence", "tvd"]
