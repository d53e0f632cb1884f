"""The in-process teacher: any transformers causal LM (preset, local folder or hub name)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.students.chat import MODE_SAMPLING, check_mode
from distill.students.generation import Generation, generate
from distill.teachers.base import TopK


class TransformersTeacher:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str,
                 batch_size: int = 64, generation_batch_size: int = 256, progress: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size  # sequences per scoring forward pass
        self.generation_batch_size = generation_batch_size
        self.progress = progress
        # Logits beyond the tokenizer's real tokens are embedding padding, never a prediction.
        self.real_vocab = len(tokenizer)

    def generate(self, prompts: list[list[int]], mode: str, *, max_new_tokens: int, seed: int,
                 sampled: bool = True) -> list[Generation]:
        sampling = MODE_SAMPLING[check_mode(mode)] if sampled else None
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                        batch_size=self.generation_batch_size, seed=seed, desc=f"teacher generates ({mode})",
                        progress=self.progress)

    @torch.inference_mode()
    def top_k_logprobs(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> list[TopK]:
        if k > self.real_vocab:
            raise ValueError(f"top_k={k} exceeds the vocabulary ({self.real_vocab} tokens)")
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        out: list[TopK] = []
        for start in tqdm(range(0, len(prompts), self.batch_size), desc="teacher scores", disable=not self.progress,
                          leave=False):
            pairs = list(zip(prompts[start:start + self.batch_size], responses[start:start + self.batch_size]))
            width = max(len(p) + len(r) for p, r in pairs)
            input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            rows, columns = [], []
            for row, (p, r) in enumerate(pairs):
                input_ids[row, :len(p) + len(r)] = torch.tensor(p + r)
                attention_mask[row, :len(p) + len(r)] = 1
                # logits at position t predict token t + 1: response token j comes from p + j - 1.
                rows += [row] * len(r)
                columns += range(len(p) - 1, len(p) + len(r) - 1)
            hidden = self.model.get_decoder()(input_ids=input_ids.to(device),
                                              attention_mask=attention_mask.to(device), use_cache=False).last_hidden_state
            # Only the response positions go through lm_head and the softmax.
            selected = hidden[torch.tensor(rows, device=device), torch.tensor(columns, device=device)]
            logits = self.model.get_output_embeddings()(selected)[:, :self.real_vocab]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor([t for _, r in pairs for t in r], device=device)
            chosen = logprobs.gather(-1, targets.clamp(max=self.real_vocab - 1)[:, None])[:, 0]
            values, ids = logprobs.topk(k, dim=-1)
            offset = 0
            for _, r in pairs:
                span = slice(offset, offset + len(r))
                out.append(TopK(ids=ids[span].to(torch.int32).cpu(), logprobs=values[span].cpu(),
                                chosen=chosen[span].cpu()))
                offset += len(r)
        return out
