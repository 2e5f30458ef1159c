"""Build a complete, tiny EasyAnimate V4 model folder offline, with seeded random weights.

The folder has the released ``EasyAnimateV4-XL-2-InP`` layout and file formats (transformer/, vae/, text_encoder/ +
tokenizer/, text_encoder_2/ in two shards + tokenizer_2/, image_encoder/ with a full CLIP checkpoint, scheduler/,
model_index.json), so everything that loads the released folder loads this one. The sizes are those of the tiny
model folder the golden pipeline vectors were made with (see tests/test_pipeline_golden.py). Both tokenizers are
built here from the bilingual corpus shipped in ``easyanimate/assets/tiny_corpus.txt``: a WordPiece ``vocab.txt``
for BERT and a sentencepiece unigram model for T5, trained at build time.

The same seed gives byte-identical files. Building takes a few seconds on a CPU.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..utils.atomic import building_directory
from .examples import DEMO_DEFAULTS
from .shapes import CHINESE_WORDS

CORPUS_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny_corpus.txt"

# The released model_index.json, HunyuanDiT-Diffusers' file: it names classes the released folder is not loaded with
# (HunyuanDiT2DModel, AutoencoderKL); the loaders choose the V4 classes themselves.
MODEL_INDEX = {
    "_class_name": "HunyuanDiTPipeline",
    "_diffusers_version": "0.28.0.dev0",
    "feature_extractor": [None, None],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "BertModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "BertTokenizer"],
    "tokenizer_2": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "HunyuanDiT2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# The released V4 scheduler config: DDPM with v-prediction (it matches the V4 training YAML's noise scheduler).
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.28.0.dev0",
    "beta_end": 0.03,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "variance_type": "fixed_small",
}

# InP transformer: 12 input channels (noisy latent + mask latent + masked-video latent), 8 output (learn_sigma).
# cross_attention_dim = BERT hidden, cross_attention_dim_t5 = T5 d_model, projection_dim = CLIP vision hidden.
TRANSFORMER_CONFIG = {
    "_class_name": "HunyuanTransformer3DModel",
    "activation_fn": "gelu-approximate",
    "after_norm": False,
    "attention_head_dim": 16,
    "basic_block_type": "basic",
    "cross_attention_dim": 32,
    "cross_attention_dim_t5": 48,
    "hidden_size": 32,
    "in_channels": 12,
    "learn_sigma": True,
    "mlp_ratio": 4.3637,
    "n_query": 16,
    "norm_type": "layer_norm",
    "num_attention_heads": 2,
    "num_layers": 4,
    "out_channels": 8,
    "patch_size": 2,
    "pooled_projection_dim": 24,
    "projection_dim": 32,
    "sample_size": 8,
    "text_len": 77,
    "text_len_t5": 256,
    "time_position_encoding": True,
}

# V4 cache-mode VAE, written like the released file: `_class_name` "AutoencoderKL" (ignored by the loader) and the
# hidden keys block_out_channels / force_upcast / sample_size next to the class's own ch / ch_mult.
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.28.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [8, 16, 32, 32],
    "cache_compression_vae": True,
    "ch": 8,
    "ch_mult": [1, 2, 4, 4],
    "down_block_types": [
        "SpatialDownBlock3D",
        "SpatialTemporalDownBlock3D",
        "SpatialTemporalDownBlock3D",
        "SpatialTemporalDownBlock3D",
    ],
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "mid_block_attention_type": "3d",
    "mini_batch_decoder": 2,
    "mini_batch_encoder": 8,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "slice_compression_vae": False,
    "slice_mag_vae": False,
    "up_block_types": [
        "SpatialUpBlock3D",
        "SpatialTemporalUpBlock3D",
        "SpatialTemporalUpBlock3D",
        "SpatialTemporalUpBlock3D",
    ],
}

BERT_CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
    layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
T5_CONFIG = dict(
    d_model=48, d_kv=16, num_heads=3, d_ff=96, num_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=False,
    is_encoder_decoder=False,
)
# Image 32 / patch 2 gives 256 patch tokens, a 16x16 grid like the release's 224/14.
CLIP_VISION_CONFIG = dict(
    hidden_size=32, image_size=32, patch_size=2, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
    projection_dim=16, dropout=0.0,
)
CLIP_TEXT_CONFIG = dict(
    hidden_size=16, intermediate_size=32, max_position_embeddings=16, num_attention_heads=2, num_hidden_layers=1,
    projection_dim=16, vocab_size=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 32,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 32,
}

BERT_SPECIAL_TOKENS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
BERT_SUFFIXES = ("##s", "##es", "##ed", "##ing", "##er", "##est", "##ly")
T5_SPECIAL_TOKENS = {"<pad>": 0, "</s>": 1, "<unk>": 2}
SENTENCEPIECE_VOCAB_SIZE = 600
_SENTENCEPIECE_REQUIRED_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))
T5_VOCAB_MULTIPLE = 64  # embedding rows are rounded up, as real T5 checkpoints pad their vocabularies

# Each component draws from its own generator so adding a component never changes the others' weights.
_COMPONENT_SEED_OFFSET = {"transformer": 1, "vae": 2, "text_encoder": 3, "text_encoder_2": 4, "image_encoder": 5}


def read_corpus(path: str | os.PathLike = CORPUS_PATH) -> list[str]:
    """The non-empty lines of the bilingual tokenizer corpus."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF


def build_bert_vocab(lines: list[str]) -> list[str]:
    """A WordPiece vocabulary in BERT's id layout: [PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103,
    then punctuation and digits, every CJK character of the corpus (BERT splits Chinese into characters), every
    lower-cased corpus word, common suffixes, and the letters a-z as word starts and ``##`` continuations so that no
    lower-case ASCII word ever becomes [UNK]."""
    from tokenizers import normalizers, pre_tokenizers

    # The same normaliser and pre-tokeniser BertTokenizer runs before WordPiece.
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    punctuation, cjk, words = set(), set(), set()
    for line in lines:
        for token, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            if len(token) == 1 and _is_cjk(token):
                cjk.add(token)
            elif token.isascii() and token.isalnum():
                words.add(token)
            else:
                punctuation.update(token)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punctuation.update(",.!?;:'\"()-，。！？；：、")
    punctuation -= set(letters) | set(digits)

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ordinary = sorted(punctuation) + digits + sorted(cjk) + letters + sorted(words - set(letters) - set(digits))
    ordinary += list(BERT_SUFFIXES) + [f"##{c}" for c in letters + digits]
    seen = set(vocab)
    for token in ordinary:
        if token not in seen:
            vocab.append(token)
            seen.add(token)
    return vocab


def train_sentencepiece(lines: list[str], vocab_size: int = SENTENCEPIECE_VOCAB_SIZE) -> bytes:
    """Train a unigram sentencepiece model (T5's ids: <pad>=0, </s>=1, <unk>=2, no BOS; NFKC) on ``lines``.

    One thread and full character coverage make the result deterministic and free of <unk> on corpus characters,
    and every printable ASCII character is a piece, so English text in any casing never produces <unk>;
    ``hard_vocab_limit=False`` lets a small corpus end with fewer pieces than asked for. The demo's Chinese words
    (``demo.shapes.CHINESE_WORDS``) are user-defined pieces, so colour, shape and motion never fuse into one piece.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        required_chars=_SENTENCEPIECE_REQUIRED_CHARS,
        user_defined_symbols=list(CHINESE_WORDS),
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _special_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_bert_tokenizer(folder: Path, vocab: list[str]) -> None:
    """Create ``folder`` with a lower-casing ``BertTokenizer`` (Chinese characters split, 77 tokens) for ``vocab``."""
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    _write_json(folder / "special_tokens_map.json", {
        "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]",
    })
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {
            str(i): {**_special_token_entry(t), "special": True} for t, i in BERT_SPECIAL_TOKENS.items()
        },
        "clean_up_tokenization_spaces": True,
        "cls_token": "[CLS]",
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": 77,
        "never_split": None,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]",
    })


def write_t5_tokenizer(folder: Path, spiece_model: bytes) -> None:
    """Create ``folder`` with a ``T5Tokenizer`` (legacy mode, no extra ids, 256 tokens) for a sentencepiece model."""
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(spiece_model)
    _write_json(folder / "special_tokens_map.json", {
        "eos_token": _special_token_entry("</s>"),
        "pad_token": _special_token_entry("<pad>"),
        "unk_token": _special_token_entry("<unk>"),
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": {
            str(i): {**_special_token_entry(t), "special": True} for t, i in T5_SPECIAL_TOKENS.items()
        },
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 0,
        "legacy": True,
        "model_max_length": 256,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })


# ----------------------------------------------------------------------------------------------------------------
# Weights


def randomize_weights_(model: torch.nn.Module, generator: torch.Generator) -> dict[str, int]:
    """Overwrite every parameter with seeded random values of non-trivial magnitude, including the tensors the
    original initialises to zero (output projections, adaLN), so a tiny model exercises every path:

    * Linear / Conv / attention weights: N(0, 1/fan_in);
    * norm weights 1 + N(0, 0.1^2), norm biases N(0, 0.1^2); other biases N(0, 0.05^2);
    * embeddings and free tensors (paddings, queries, class embeddings): N(0, 0.5^2).

    Parameters are visited in registration order, so the result depends only on the model and the generator.
    Returns how many tensors each rule touched.
    """
    counts = {"weight": 0, "bias": 0, "norm": 0, "embedding": 0, "free": 0}
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        is_embedding = isinstance(module, torch.nn.Embedding)
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if is_norm and param.ndim == 1:
                rule = "norm"
                value = (1.0 + 0.1 * noise) if "weight" in name else 0.1 * noise
            elif is_embedding:
                rule, value = "embedding", 0.5 * noise
            elif "weight" in name and param.ndim >= 2:
                rule, value = "weight", noise / math.sqrt(math.prod(param.shape[1:]))
            elif "bias" in name:
                rule, value = "bias", 0.05 * noise
            else:
                rule, value = "free", 0.5 * noise
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
            counts[rule] += 1
    return counts


def _generator(seed: int, component: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 16 + _COMPONENT_SEED_OFFSET[component])


def _state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates removed (safetensors refuses shared storage) and contiguous tensors."""
    state, seen = {}, {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr in seen:
            continue
        seen[ptr] = key
        state[key] = tensor.detach().contiguous().clone()
    return state


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_transformers_config(config, folder: Path) -> None:
    config.save_pretrained(folder)  # config.json with the non-default keys, like the released files


def write_transformer(folder: Path, seed: int) -> None:
    """Create ``folder`` with ``TRANSFORMER_CONFIG`` and random weights (``diffusion_pytorch_model.safetensors``)."""
    from ..models.transformer import HunyuanTransformer3DModel

    _write_diffusers_model(HunyuanTransformer3DModel, TRANSFORMER_CONFIG, folder, seed, "transformer")


def write_vae(folder: Path, seed: int) -> None:
    """Create ``folder`` with ``VAE_CONFIG`` and random weights (``diffusion_pytorch_model.safetensors``)."""
    from ..models.vae import AutoencoderKLMagvit

    _write_diffusers_model(AutoencoderKLMagvit, VAE_CONFIG, folder, seed, "vae")


def _write_diffusers_model(cls, config: dict, folder: Path, seed: int, component: str) -> None:
    model = cls.from_config(config)
    randomize_weights_(model, _generator(seed, component))
    folder.mkdir(parents=True)
    _write_json(folder / "config.json", config)
    save_file(_state_dict_for_saving(model), str(folder / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})


def write_bert(folder: Path, seed: int, vocab_size: int) -> None:
    """Create ``folder`` with a random ``BertModel`` (config.json + ``model.safetensors``)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, **BERT_CONFIG)
    config.architectures = ["BertModel"]
    model = BertModel(config)  # with the (unused) pooler, like the release
    randomize_weights_(model, _generator(seed, "text_encoder"))
    folder.mkdir(parents=True)
    _write_transformers_config(config, folder)
    save_file(_state_dict_for_saving(model), str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_t5_encoder(folder: Path, seed: int, vocab_size: int, residual_scale: float = 1.0) -> None:
    """T5EncoderModel in two safetensors shards plus ``model.safetensors.index.json``, like the release.

    ``residual_scale`` multiplies the output projections of every attention and feed-forward block (``o``, ``wo``).
    At 1 (random weights of unit gain) each token's state is dominated by the rest of the caption: a word's states
    in two captions have cosine ~0.5, a context hash no trained encoder has. Below 1 the word's own embedding
    dominates (0.2: cosine ~0.92, like the tiny BERT), as a trained encoder's consistent word meanings do."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, **T5_CONFIG)
    config.tie_word_embeddings = False  # untied like mT5; T5Config.__init__ in transformers 5 ignores the keyword
    config.architectures = ["T5EncoderModel"]
    model = T5EncoderModel(config)
    randomize_weights_(model, _generator(seed, "text_encoder_2"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("SelfAttention.o.weight", "DenseReluDense.wo.weight")):
                param.mul_(residual_scale)
    folder.mkdir(parents=True)
    _write_transformers_config(config, folder)
    state = _state_dict_for_saving(model)
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; the release stores it once
    keys = sorted(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    total, running, split = sum(sizes), 0, len(keys)
    for i, size in enumerate(sizes):
        if running + size > total / 2 and i > 0:
            split = i
            break
        running += size
    shards = {"model-00001-of-00002.safetensors": keys[:split], "model-00002-of-00002.safetensors": keys[split:]}
    weight_map = {}
    for file, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard_keys})
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def write_clip(folder: Path, seed: int) -> None:
    """A full CLIP model (text and vision halves) as ``pytorch_model.bin``, like the release; the pipeline loads only
    ``CLIPVisionModelWithProjection`` from it."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=CLIP_TEXT_CONFIG, vision_config=CLIP_VISION_CONFIG, projection_dim=16)
    config.architectures = ["CLIPModel"]
    model = CLIPModel(config)
    randomize_weights_(model, _generator(seed, "image_encoder"))
    folder.mkdir(parents=True)
    _write_transformers_config(config, folder)
    _write_json(folder / "preprocessor_config.json", CLIP_PREPROCESSOR_CONFIG)
    state = {k: v for k, v in _state_dict_for_saving(model).items() if not k.endswith("position_ids")}
    torch.save(state, folder / "pytorch_model.bin")  # same tensors, same bytes (the determinism test checks it)


# ----------------------------------------------------------------------------------------------------------------


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, *, overwrite: bool = False,
                     t5_residual_scale: float = 1.0) -> Path:
    """Write a complete tiny model folder in the released V4 layout to ``out_dir`` and return its path
    (``t5_residual_scale``: see ``write_t5_encoder``).

    The folder is assembled in a temporary sibling directory and renamed into place at the end, so an interrupted
    build never leaves a folder that looks complete. An existing ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True (--overwrite)")
    corpus = read_corpus()

    with building_directory(out_dir) as work:
        vocab = build_bert_vocab(corpus)
        write_bert_tokenizer(work / "tokenizer", vocab)
        spiece = train_sentencepiece(corpus)
        write_t5_tokenizer(work / "tokenizer_2", spiece)
        n_pieces = _sentencepiece_size(spiece)
        t5_vocab = -(-n_pieces // T5_VOCAB_MULTIPLE) * T5_VOCAB_MULTIPLE

        write_bert(work / "text_encoder", seed, len(vocab))
        write_t5_encoder(work / "text_encoder_2", seed, t5_vocab, t5_residual_scale)
        write_clip(work / "image_encoder", seed)
        (work / "scheduler").mkdir()
        _write_json(work / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_transformer(work / "transformer", seed)
        write_vae(work / "vae", seed)
        _write_json(work / "model_index.json", MODEL_INDEX)
        DEMO_DEFAULTS.write(work)  # small sizes: the tiny model (and the demo built on it) run in seconds
    return out_dir


def _sentencepiece_size(model_proto: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_proto).get_piece_size()
