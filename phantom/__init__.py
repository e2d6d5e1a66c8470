"""The phantom world: our addition, not the paper's, so that every stage runs out of the box on a CPU with no data.

Small synthetic chest CTs with the 18 CT-RATE abnormalities drawn into them, reports, labels and VQA in the exact
CT-RATE / RAD-ChestCT formats (world.py), a tiny Qwen2-architecture LLM with a locally trained tokenizer and a tiny
text encoder (llm.py), and the warm-up that teaches the tiny LLM its language and to read image embeddings, as a
pretrained Qwen2.5 already can (warmup.py). A reader of the method can skip this package.

    python -m phantom quickstart            # the whole method: every stage, then the time and results tables
    python -m phantom world                 # build runs/phantom (every stage also builds it when missing)
    python -m phantom warmup                # train the tiny LLM -> runs/warmup (sft.py's default --llm)
    python -m phantom dataset --out DIR     # only the raw dataset, in the CT-RATE v2 / RAD-ChestCT layouts
"""
from phantom.world import ensure_world, make_phantom  # noqa: F401  (the package's API)
