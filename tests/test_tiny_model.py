"""The offline tiny model builder: complete released layout, loadable by the library classes, reproducible, and
tokenizers that cover the demo captions in English and Chinese."""

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch

from easyanimate.demo.tiny_model import build_tiny_model
from easyanimate.utils.weights import load_model_from_folder, read_folder_weights

EXPECTED_FILES = {
    "model_index.json",
    "generation_defaults.json",  # the recommended settings every front end starts from
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
    "image_encoder/config.json",
    "image_encoder/preprocessor_config.json",
    "image_encoder/pytorch_model.bin",
}

COLOURS_EN = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "brown", "cyan"]
SHAPES_EN = ["circle", "square", "triangle", "rectangle", "star", "diamond", "oval", "hexagon", "ball", "heart"]
MOTIONS_EN = ["moving to the left", "moving to the right", "moving up", "moving down", "standing still",
              "rotating clockwise", "bouncing up and down"]
COLOURS_ZH = ["红色", "绿色", "蓝色", "黄色", "橙色", "紫色", "粉色", "白色", "黑色", "灰色", "棕色", "青色"]
SHAPES_ZH = ["圆形", "正方形", "三角形", "矩形", "星形", "菱形", "椭圆形", "六边形", "球", "心形"]
MOTIONS_ZH = ["向左移动", "向右移动", "向上移动", "向下移动", "静止不动", "顺时针旋转", "上下弹跳"]


def demo_captions() -> list[str]:
    english = [f"A {c} {s} {m}." for c, s, m in itertools.product(COLOURS_EN, SHAPES_EN, MOTIONS_EN)]
    chinese = [f"一个{c}的{s}{m}。" for c, s, m in itertools.product(COLOURS_ZH, SHAPES_ZH, MOTIONS_ZH)]
    return english + chinese


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_layout_is_complete(tiny_model_dir):
    files = {str(p.relative_to(tiny_model_dir)) for p in tiny_model_dir.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.endswith(".partial")]
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "HunyuanDiT2DModel"]  # the released file's (misleading) names
    vae_config = json.loads((tiny_model_dir / "vae/config.json").read_text())
    assert vae_config["block_out_channels"] == [8, 16, 32, 32] and vae_config["cache_compression_vae"] is True
    transformer_config = json.loads((tiny_model_dir / "transformer/config.json").read_text())
    assert (transformer_config["in_channels"], transformer_config["out_channels"]) == (12, 8)


def test_components_load_with_library_classes(tiny_model_dir):
    from diffusers import DDPMScheduler
    from transformers import (BertModel, BertTokenizer, CLIPImageProcessor, CLIPVisionModelWithProjection,
                              T5EncoderModel, T5Tokenizer)

    bert_tok = BertTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    t5_tok = T5Tokenizer.from_pretrained(tiny_model_dir / "tokenizer_2")
    bert = BertModel.from_pretrained(tiny_model_dir / "text_encoder")
    t5 = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder_2")
    clip = CLIPVisionModelWithProjection.from_pretrained(tiny_model_dir / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(tiny_model_dir / "image_encoder")
    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert len(bert_tok) == bert.config.vocab_size
    assert len(t5_tok) <= t5.config.vocab_size

    ids = bert_tok("a red circle", return_tensors="pt")
    hidden = bert(**ids).last_hidden_state
    assert hidden.shape == (1, 5, 32) and hidden.std() > 0.1
    ids_2 = t5_tok("a red circle", return_tensors="pt")
    assert t5(**ids_2).last_hidden_state.shape[-1] == 48
    from PIL import Image

    pixels = processor(images=Image.new("RGB", (40, 36), (200, 30, 30)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    tokens = clip(pixels).last_hidden_state
    assert tokens.shape == (1, 257, 32)  # 256 patch tokens + CLS, like the release's 16x16 grid


def test_transformer_and_vae_load_strictly(tiny_model_dir):
    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.models.vae import AutoencoderKLMagvit

    transformer = load_model_from_folder(HunyuanTransformer3DModel, tiny_model_dir, "transformer")
    vae = load_model_from_folder(AutoencoderKLMagvit, tiny_model_dir, "vae")
    assert transformer.config.in_channels == 12
    # Tensors the original initialises to zero get real values, so every path of the tiny model is exercised.
    assert transformer.proj_out.weight.abs().mean() > 0.01
    assert vae.config.latent_channels == 4


def test_tokenizers_cover_demo_captions(tiny_model_dir):
    from transformers import BertTokenizer, T5Tokenizer

    bert_tok = BertTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    t5_tok = T5Tokenizer.from_pretrained(tiny_model_dir / "tokenizer_2")
    captions = demo_captions() + ["A young woman with blonde hair stands in a quiet forest, wearing a golden crown.",
                                  "一只小猫在花园里追蝴蝶，阳光明媚，画面清晰，质量高。"]
    for caption in captions:
        bert_ids = bert_tok(caption).input_ids
        assert bert_tok.unk_token_id not in bert_ids, (caption, bert_tok.convert_ids_to_tokens(bert_ids))
        t5_ids = t5_tok(caption).input_ids
        assert t5_tok.unk_token_id not in t5_ids, (caption, t5_tok.convert_ids_to_tokens(t5_ids))
    # the T5 decode/re-encode round trip the pipeline does must be lossless on these captions
    for caption in captions[:: 37]:
        ids = t5_tok(caption).input_ids
        assert t5_tok(t5_tok.decode(ids, skip_special_tokens=True)).input_ids == ids
    # BERT splits Chinese into characters; unseen English words fall back to letter pieces, never [UNK]
    assert bert_tok.tokenize("一个红色") == ["一", "个", "红", "色"]
    assert bert_tok.unk_token_id not in bert_tok("Zyxquv").input_ids
    # mT5 keeps colour, shape and motion apart in Chinese, so held-out pairings reuse the pieces of training ones
    assert t5_tok.tokenize("一个红色的正方形向左移动") == ["▁", "一个", "红色", "的", "正方形", "向左", "移动"]
    assert t5_tok.tokenize("蓝色的三角形静止不动") == ["▁", "蓝色", "的", "三角形", "静止", "不动"]


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert file_digests(again) == file_digests(tiny_model_dir)

    other = build_tiny_model(tmp_path / "other", seed=1)
    a = read_folder_weights(tiny_model_dir / "transformer")
    b = read_folder_weights(other / "transformer")
    assert a.keys() == b.keys()
    assert not torch.equal(a["proj_out.weight"], b["proj_out.weight"])
    # the tokenizers do not depend on the seed
    assert (other / "tokenizer_2/spiece.model").read_bytes() == (tiny_model_dir / "tokenizer_2/spiece.model").read_bytes()


def test_existing_folder_is_not_overwritten(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_model(target)
    assert (target / "mine.txt").read_text() == "keep me"


def test_script_builds_a_folder(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "scripted"
    result = subprocess.run([sys.executable, str(repo / "scripts/make_tiny_model.py"), str(out), "--seed", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert (out / "transformer/diffusion_pytorch_model.safetensors").is_file()
