"""The typical cold start of bench/cold_start.py, (c): a fresh process loads the model the
ordinary way and runs the first inference.

``import torch`` and ``transformers``, then ``AutoTokenizer.from_pretrained`` and
``AutoModel.from_pretrained`` of the model directory, then one sentence through the
encoder with sentence-transformers' pooling (mean over the attention mask, then L2
normalisation: what the platform's ``bert-embedding`` runner computes). Prints one JSON
line: CLOCK_MONOTONIC timestamps (comparable with the parent's, which times the spawn)
after each phase, the embedding and the versions. Nothing but ``json``, ``sys`` and
``time`` is imported before the first timestamp.

Run by cold_start.py; alone:  .venv/bin/python bench/_cold_start_child.py MODEL_DIR TEXT
"""

from __future__ import annotations

import json
import sys
import time


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def main(model_dir: str, text: str) -> int:
    started = now_ns()  # the interpreter is up and this module is running
    import torch  # noqa: PLC0415 - importing is part of what is timed
    import transformers  # noqa: PLC0415

    imported = now_ns()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer_loaded = now_ns()
    model = transformers.AutoModel.from_pretrained(model_dir)
    model.eval()
    model_loaded = now_ns()
    with torch.inference_mode():
        enc = tokenizer([text], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    done = now_ns()
    report = {
        "started_ns": started,
        "imported_ns": imported,
        "tokenizer_ns": tokenizer_loaded,
        "model_ns": model_loaded,
        "result_ns": done,
        "embedding": [float(x) for x in emb[0]],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
