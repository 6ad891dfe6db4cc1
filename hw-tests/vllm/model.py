"""A random-weight Llama with a larger KV cache than the recipe's tiny model, for the
TandemConnector hw-test: `python3 model.py OUT LAYERS KV_HEADS HEAD_DIM` writes the weights and
the tokenizer of /tmp/tiny (the recipe's, reused so prompts tokenize alike) to OUT. Greedy
outputs of random weights are still deterministic, which is all the comparison needs."""

import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out, layers, kv_heads, head_dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tok = PreTrainedTokenizerFast.from_pretrained("/tmp/tiny")
os.makedirs(out, exist_ok=True)
tok.save_pretrained(out)
cfg = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=kv_heads, head_dim=head_dim,
                  vocab_size=len(tok), max_position_embeddings=8192,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
torch.manual_seed(1)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
shutil.copy("/tmp/tiny/prompt.txt", os.path.join(out, "prompt.txt"))
print("model at", out, "layers", layers, "kv_heads", kv_heads, "head_dim", head_dim,
      "KV bytes/token", layers * 2 * kv_heads * head_dim * 2)
