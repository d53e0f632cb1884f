"""The Qwen3 model family, whatever role a model plays (the students, and the teachers built from
the same blocks): the one size table (`presets`), model building (`build`: random, pretrained,
from a teacher's blocks; the MoE experts' CPU forward in `experts`), tokenizers (`tokenizer`), chat in both modes and the per-mode sampling
table (`chat`), decoding in process (`generation`, with the lean Qwen3 decoder in `decode`), and
decoding behind a vLLM server (`vllm_server`, `vllm_client`, `install_vllm.sh`).

The bottom layer of the model code: it imports only distill.common."""
