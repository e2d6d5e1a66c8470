"""The phantom world's language models: a tiny Qwen2-architecture LLM with a byte-level BPE tokenizer trained locally
on the phantom texts, a tiny BERT-style text encoder for clip3d.py, and the warm-up's MMVQA rationale format.

Both models are written as ordinary Hugging Face directories, so the stages load them exactly as they load
Qwen2.5-3B or CXR-BERT.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import data
from model import IMAGE_TOKEN, TAG_TOKENS, VISION_END, VISION_START
from runtime import atomic_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_TOKEN]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llm(texts: list[str], out_dir: str | Path, vocab_size: int = 2048, hidden: int = 256, layers: int = 4,
                   heads: int = 4, kv_heads: int = 2, intermediate: int | None = None, seed: int = 0) -> Path:
    """An untrained Qwen2-architecture LLM + byte-level BPE tokenizer (trained on `texts`) as an HF directory, loaded
    like Qwen2.5-3B; eos <|im_end|>, pad <|endoftext|>, MLP 2 × hidden (Qwen2.5: ~5.4×; docs/NOTES.md)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts) + ["system", "user", "assistant"] * 10, trainer)
    # tags are single tokens but not "special": decode(skip_special_tokens=True) keeps them
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=4096)
    tokenizer.chat_template = CHATML_TEMPLATE
    config = Qwen2Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=intermediate or 2 * hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = Qwen2ForCausalLM(config)
    llm.generation_config.eos_token_id, llm.generation_config.pad_token_id = config.eos_token_id, config.pad_token_id
    with atomic_dir(out_dir) as tmp:
        llm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def phantom_texts(paths: dict) -> list[str]:
    """The texts the tiny tokenizer learns from: reports, VQA, MMVQA prompts and targets of the training split."""
    sections = ({"findings": 1, "impressions": 1}, {"findings": 1}, {"impressions": 1})
    texts = [data.report_instruction(s) for s in sections]
    for report in data.read_reports(paths["train_reports"]).values():
        texts += [s for s in (report["findings"], report["impressions"]) if s]
    for item in data.read_vqa(paths["train_vqa"]):
        texts += [item["question"], item["answer"]]
    labels = data.read_labels(paths["train_labels"])
    for item in json.loads(Path(paths["mmvqa_train"]).read_text()):
        present = [name for name, y in zip(data.ABNORMALITIES, labels.get(item["VolumeName"], [])) if y]
        for think in (True, False):
            texts += [data.mmvqa_prompt(item, think=think), mmvqa_target(item, present, think=think)]
    return texts


def mmvqa_target(item: dict, abnormal_names_present: list[str], think: bool = True) -> str:
    """The warm-up's MMVQA completion: the option the scan shows, each option in turn, the key, then what else it
    shows. Every claim is checkable against the report. The order suits a small LLM: naming the present option
    first is one look at the image restricted to the option names; the walk copies the options in order and gives
    each name the stance it had the last time it was written (hence "X present", no colon); the key is the letter
    next to "present"; the list of all findings comes last, so that it gives the walk nothing to copy from."""
    key, answer = item["answer"], f"<answer>{item['answer']}</answer>"
    if not think:
        return answer
    present = list(abnormal_names_present)  # names spelled as in the options: the rationale copies them verbatim
    shown = (", ".join(present[:-1]) + " and " + present[-1] if len(present) > 1 else present[0]) if present \
        else "no abnormality"
    walk = " ".join(f"{l}) {v} {'present' if l == key else 'not seen'}." for l, v in item["options"].items())
    return (f"<think>Of the options, {item['options'][key]} present. {walk} The answer is {key}. "
            f"The scan shows {shown}.</think>{answer}")


def build_text_encoder(llm_dir: str | Path, out: str | Path) -> Path:
    """A randomly initialised BERT-style encoder with the tiny LLM's tokenizer, as an HF directory (clip3d.py's
    phantom text encoder). No dropout, so that its output does not depend on the number of ranks."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = BertModel(config)                                      # pooler kept so AutoModel loads quietly
    with atomic_dir(out) as tmp:
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)
