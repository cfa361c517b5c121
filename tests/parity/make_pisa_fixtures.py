#!/usr/bin/env python3
"""Build the PiSA-SR parity fixtures in tests/fixtures/pisa/ (dev-only tool).

What it makes
-------------
Small, randomly initialised models with the *structure* of Stable Diffusion
2.1-base, a PiSA-SR-style dual-LoRA checkpoint, a tiny LR image and the
reference maths of PiSA-SR's adjustable inference run in float64 with
PyTorch + diffusers + transformers + peft.  The Rust engine is checked against
`reference.safetensors` (latents to 1e-4, images to 1e-3 max abs).  See
tests/parity/README.md for the list of files and tensors.

    tests/fixtures/pisa/
      sd21-tiny/                 diffusers layout, like stabilityai/stable-diffusion-2-1-base
        model_index.json
        unet/{config.json, diffusion_pytorch_model.safetensors}
        vae/{config.json, diffusion_pytorch_model.bin}        (torch pickle on purpose)
        text_encoder/{config.json, model.safetensors}
        tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
        scheduler/scheduler_config.json                       (unused by PiSA; makes the folder loadable)
      pisa_sr_tiny.pkl           torch.save dict laid out like PiSA-SR's save_model
      lr.png                     19x13 RGB8 input
      reference.safetensors      inputs and intermediates (f32, computed in f64)

How to install and run (outside the repo, CPU only, PyPI only)
--------------------------------------------------------------
    python3 -m venv /work/pyref
    /work/pyref/bin/pip install torch diffusers transformers peft safetensors pillow numpy
    cd <repo root>
    /work/pyref/bin/python tests/parity/make_pisa_fixtures.py

It is deterministic (fixed seeds) and overwrites the fixtures each run.  It was
written against torch 2.15, diffusers 0.42, transformers 5.25, peft 0.21,
Pillow 13 (printed at start); other versions should give the same files up to
float rounding, but regenerating means re-checking the Rust side.

Everything here is written from the descriptions in
shared/research/reference-models.md (sections 1, 3, 4, 12) and PiSA-SR's public
code (initialize_unet / save_model / wavelet_color_fix.py); no code is copied.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "pisa"
SD = OUT / "sd21-tiny"

# ---------------------------------------------------------------- constants
LR_W, LR_H = 19, 13          # LR input; x4 gives 76x52 (not a multiple of 8)
UPSCALE = 4
TIMESTEP = 1                 # PiSA feeds t = 1 to the UNet
SCALING_FACTOR = 0.18215
LORA_RANK = 4
LORA_ALPHA = 8               # peft's LoraConfig default; PiSA never sets it
LORA_SCALE = LORA_ALPHA / LORA_RANK
# A ~ N(0, 1/fan_in), B ~ N(0, gain^2/r): per-layer relative change ~ LORA_SCALE*gain.
# With these gains the pixel LoRA moves eps by ~36 % and the semantic one moves
# eps_pix by ~29 % (printed at run time).
LORA_GAIN_PIX = 0.02
LORA_GAIN_SEM = 0.02
LAMBDAS = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 0.25), (1.2, 0.8)]
SEEDS = dict(text_encoder=101, vae=202, unet=303, lora=404, image=505)

# PiSA-SR's target rule (initialize_unet)
LORA_PATTERNS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2",
                 "conv_in", "conv_shortcut", "conv_out", "proj_out", "proj_in",
                 "ff.net.2", "ff.net.0.proj"]
FAMILIES = ["encoder", "decoder", "others"]
BRANCHES = ["pix", "sem"]


def adapter(family: str, branch: str) -> str:
    return f"default_{family}_{branch}"


# ---------------------------------------------------------------- configs
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[16, 32, 48, 48],
    layers_per_block=2,
    attention_head_dim=[2, 4, 6, 6],   # = number of heads in diffusers (SD2.1 quirk)
    cross_attention_dim=32,
    use_linear_projection=True,
    norm_num_groups=8,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    upcast_attention=False,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 48, 48],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    act_fn="silu",
    sample_size=64,
    scaling_factor=SCALING_FACTOR,
)

# A handful of BPE merges on top of CLIP's 512 byte tokens.
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"),
          ("in", "g</w>"), ("e", "r</w>"), ("o", "n</w>"), ("p", "h"), ("ph", "o"),
          ("t", "o</w>"), ("o", "f</w>")]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKEN_EXAMPLES = ["", "a photo of the thing", "The cat AND  the Dog!", "ing'nt 42"]


# ---------------------------------------------------------------- helpers
def log(*a):
    print(*a, flush=True)


def reinit_(model: nn.Module, seed: int) -> int:
    """Re-initialise every parameter so that no path is zero or trivial.

    weights ~ N(0, 1/fan_in); biases ~ 0.1 N(0,1); norm weights 1 + 0.1 N;
    norm biases 0.1 N; embedding tables ~ N(0, 1).  Returns the count."""
    g = torch.Generator().manual_seed(seed)
    seen = 0
    with torch.no_grad():
        for _, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                rnd = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                    val = (1.0 + 0.1 * rnd) if pname == "weight" else 0.1 * rnd
                elif isinstance(mod, nn.Embedding):
                    val = rnd
                elif p.ndim >= 2:
                    val = rnd / math.sqrt(p[0].numel())
                elif p.ndim == 1:
                    val = 0.1 * rnd
                else:
                    raise RuntimeError(f"unexpected parameter {pname} in {type(mod)}")
                p.copy_(val)
                seen += 1
    total = len(list(model.parameters()))
    assert seen == total, (seen, total)
    return seen


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (printable bytes map to themselves)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
            + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table, extra = {}, 0
    for b in keep:
        table[b] = chr(b)
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the vocabulary as `keep` first, then the remapped bytes
    return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


def write_tokenizer(folder: Path) -> None:
    """A tiny but valid CLIP BPE tokenizer in SD2.1-base's file layout.

    transformers 5's save_pretrained only writes tokenizer.json, so the four
    legacy files SD2.1-base ships are written here in its format and then
    checked by loading them with CLIPTokenizer.from_pretrained."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + [BOS, EOS]
    assert len(set(vocab)) == len(vocab)
    ids = {t: i for i, t in enumerate(vocab)}
    assert ids["!"] == 0
    bos_id, eos_id = ids[BOS], ids[EOS]
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")

    def tok_entry(content, normalized):
        return dict(content=content, lstrip=False, normalized=normalized, rstrip=False,
                    single_word=False)

    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "0": {**tok_entry("!", False), "special": True},
            str(bos_id): {**tok_entry(BOS, True), "special": True},
            str(eos_id): {**tok_entry(EOS, True), "special": True},
        },
        "additional_special_tokens": [],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "tokenizer_file": None,
        "unk_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    stm = {"bos_token": tok_entry(BOS, True), "eos_token": tok_entry(EOS, True),
           "pad_token": "!", "unk_token": tok_entry(EOS, True)}
    (folder / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


def lora_module_lists(unet: nn.Module) -> dict[str, list[str]]:
    """PiSA-SR's rule: parameter names without bias/norm containing a pattern."""
    out = {f: [] for f in FAMILIES}
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        if not any(p in n for p in LORA_PATTERNS):
            continue
        name = n.replace(".weight", "")
        if "down_blocks" in n or "conv_in" in n:
            out["encoder"].append(name)
        elif "up_blocks" in n or "conv_out" in n:
            out["decoder"].append(name)
        else:
            out["others"].append(name)
    return out


def pil_bicubic(img01: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Pillow BICUBIC on float32 ('F') images, one channel at a time."""
    from PIL import Image
    chans = []
    for c in range(img01.shape[2]):
        im = Image.fromarray(np.ascontiguousarray(img01[:, :, c], dtype=np.float32))
        assert im.mode == "F", im.mode
        chans.append(np.asarray(im.resize(size_wh, Image.BICUBIC), dtype=np.float32))
    return np.stack(chans, axis=2)


def adain_fix(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    def stats(t):
        f = t.reshape(t.shape[0], t.shape[1], -1)
        return (f.mean(dim=2)[:, :, None, None],
                (f.var(dim=2, unbiased=True) + eps).sqrt()[:, :, None, None])
    mx, sx = stats(x)
    mr, sr = stats(ref)
    return ((x - mx) / sx * sr + mr).clamp(0.0, 1.0)


def binomial_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)
    k = (k1[:, None] * k1[None, :]) / 16.0
    c = x.shape[1]
    k = k[None, None].repeat(c, 1, 1, 1)
    xp = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(xp, k, groups=c, dilation=dilation)


def wavelet_split(x: torch.Tensor, levels: int = 5):
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = binomial_blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_fix(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    high, _ = wavelet_split(x)
    _, low = wavelet_split(ref)
    return (high + low).clamp(0.0, 1.0)


def make_lr_image(seed: int) -> np.ndarray:
    """19x13 RGB8: smooth gradients, a couple of hard edges, some noise."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:LR_H, 0:LR_W].astype(np.float64)
    u, v = xx / (LR_W - 1), yy / (LR_H - 1)
    r = 0.15 + 0.7 * u
    g = 0.2 + 0.6 * v + 0.1 * np.sin(3.0 * u * np.pi)
    b = 0.5 + 0.35 * np.cos(2.0 * np.pi * (u + 0.5 * v))
    img = np.stack([r, g, b], axis=2)
    img[:, 12:15, :] = [0.95, 0.9, 0.1]           # vertical bright bar (hard edges)
    img[(xx + 2 * yy) > 26] *= 0.35               # dark diagonal half-plane
    img[2:5, 2:6, :] = [0.02, 0.02, 0.9]          # small blue block
    img += rs.normal(0.0, 0.04, img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def canonicalise_safetensors_header(path: Path) -> None:
    """safetensors writes __metadata__ in hash-map order, so the file bytes change
    from run to run.  Rewrite the JSON header with sorted keys (same length, same
    offsets) so that regenerating gives byte-identical files."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    assert len(text) <= n, (len(text), n)
    raw[8:8 + n] = text + b" " * (n - len(text))
    path.write_bytes(bytes(raw))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference(lr8: np.ndarray, dtype: torch.dtype, check_merge: bool):
    """PiSA-SR adjustable-mode maths on the files under OUT, in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    prev_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    tok = CLIPTokenizer.from_pretrained(SD / "tokenizer")
    te = CLIPTextModel.from_pretrained(SD / "text_encoder", dtype=dtype).eval()
    vae = AutoencoderKL.from_pretrained(SD / "vae", use_safetensors=False, torch_dtype=dtype).eval()
    unet_base = UNet2DConditionModel.from_pretrained(SD / "unet", torch_dtype=dtype).eval()
    unet = UNet2DConditionModel.from_pretrained(SD / "unet", torch_dtype=dtype).eval()
    sf = vae.config.scaling_factor
    assert sf == SCALING_FACTOR

    H, W = LR_H * UPSCALE, LR_W * UPSCALE
    PH, PW = -(-H // 8) * 8, -(-W // 8) * 8
    lr01 = lr8.astype(np.float32) / np.float32(255.0)
    bic_raw = pil_bicubic(lr01, (W, H))                            # [H, W, 3] f32
    bicubic_unclamped = torch.from_numpy(bic_raw).permute(2, 0, 1)[None].to(dtype)
    bicubic = bicubic_unclamped.clamp(0.0, 1.0)
    padded = F.pad(bicubic, (0, PW - W, 0, PH - H), mode="replicate")
    x_in = padded * 2.0 - 1.0

    ref, diag = {}, {"pad": (PH, PW)}
    with torch.no_grad():
        ids = torch.tensor([tok("", padding="max_length", max_length=77,
                                truncation=True).input_ids], dtype=torch.long)
        embedding = te(ids)[0]
        z_l = vae.encode(x_in).latent_dist.mean * sf
        t = torch.tensor(TIMESTEP, dtype=torch.long)

        def run(model):
            return model(z_l, t, encoder_hidden_states=embedding).sample

        eps_base = run(unet_base)

        # load the checkpoint the way PiSA-SR's _load_and_save_ckpt_from_state_dict does
        sd = torch.load(OUT / "pisa_sr_tiny.pkl", map_location="cpu", weights_only=True)
        for br in BRANCHES:
            for fam in FAMILIES:
                unet.add_adapter(LoraConfig(r=sd[f"lora_rank_unet_{br}"], init_lora_weights="gaussian",
                                            target_modules=sd[f"unet_lora_{fam}_modules_{br}"]),
                                 adapter_name=adapter(fam, br))
        copied = 0
        for name, p in unet.named_parameters():
            if "lora" in name:
                p.data.copy_(sd["state_dict_unet"][name])
                copied += 1
        assert copied == len(sd["state_dict_unet"])
        unet.eval()
        pix = [adapter(f, "pix") for f in FAMILIES]
        allad = pix + [adapter(f, "sem") for f in FAMILIES]
        unet.set_adapters(pix, weights=[1.0] * 3)
        eps_pix = run(unet)
        unet.set_adapters(allad, weights=[1.0] * 6)
        eps_full = run(unet)

        if check_merge:
            # W_pix = W0 + s B_pix A_pix, then W_full = W_pix + s B_sem A_sem (as PiSA merges)
            merged = UNet2DConditionModel.from_pretrained(SD / "unet", torch_dtype=dtype).eval()
            lsd = sd["state_dict_unet"]

            def merge(branch):
                for fam in FAMILIES:
                    for m in sd[f"unet_lora_{fam}_modules_{branch}"]:
                        a = lsd[f"{m}.lora_A.{adapter(fam, branch)}.weight"].to(dtype)
                        b = lsd[f"{m}.lora_B.{adapter(fam, branch)}.weight"].to(dtype)
                        w = merged.get_submodule(m).weight
                        delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
                        w.add_(LORA_SCALE * delta)

            merge("pix")
            eps_pix_m = run(merged)
            merge("sem")
            eps_full_m = run(merged)
            d_pix = float((eps_pix - eps_pix_m).abs().max())
            d_full = float((eps_full - eps_full_m).abs().max())
            log(f"merge check ({dtype}): max|eps_pix adapter - merged| = {d_pix:.3e}, "
                f"max|eps_full adapter - merged| = {d_full:.3e}")
            assert d_pix < 1e-10 and d_full < 1e-10

            log(f"eps_base std {float(eps_base.std()):.4f}; "
                f"pix LoRA changes eps by {100 * rel(eps_pix, eps_base):.1f} %; "
                f"sem LoRA changes eps_pix by {100 * rel(eps_full, eps_pix):.1f} %")

        def decode(z):
            x = vae.decode(z / sf).sample.clamp(-1.0, 1.0) * 0.5 + 0.5
            return x[:, :, :H, :W]

        raw_dec = vae.decode(z_l / sf).sample
        diag["saturated"] = float((raw_dec.abs() >= 1.0).double().mean())
        if check_merge:
            log(f"VAE decode (pre-clamp): std {float(raw_dec.std()):.4f}, "
                f"min {float(raw_dec.min()):.3f}, max {float(raw_dec.max()):.3f}, "
                f"fraction |x|>=1: {100 * diag['saturated']:.1f} %")
        ref.update(bicubic=bicubic, bicubic_unclamped=bicubic_unclamped, x_in=x_in,
                   embedding=embedding, z_l=z_l, eps_base=eps_base, eps_pix=eps_pix,
                   eps_full=eps_full, x_vae=decode(z_l))
        for k, (lp, ls) in enumerate(LAMBDAS):
            eps = lp * eps_pix + ls * (eps_full - eps_pix)
            z_h = z_l - eps
            x = decode(z_h)
            ref[f"eps.{k}"] = eps
            ref[f"z_h.{k}"] = z_h
            ref[f"x.{k}"] = x
            ref[f"x_adain.{k}"] = adain_fix(x, bicubic)
            ref[f"x_wavelet.{k}"] = wavelet_fix(x, bicubic)
    torch.set_default_dtype(prev_dtype)
    return ref, diag


# ---------------------------------------------------------------- main
def main() -> int:
    import diffusers
    import peft
    import PIL
    import safetensors
    import transformers
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from PIL import Image
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__, "pillow": PIL.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0]}
    log("versions:", json.dumps(versions))
    assert LoraConfig(r=LORA_RANK).lora_alpha == LORA_ALPHA, "peft default lora_alpha changed"

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    if OUT.exists():
        shutil.rmtree(OUT)
    SD.mkdir(parents=True)

    # ---------------- tokenizer
    write_tokenizer(SD / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(SD / "tokenizer")
    bos_id, eos_id, pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    vocab_size = len(tok)
    input_ids = tok("", padding="max_length", max_length=77, truncation=True).input_ids
    assert pad_id == 0 and bos_id == vocab_size - 2 and eos_id == vocab_size - 1
    assert input_ids == [bos_id, eos_id] + [0] * 75, input_ids[:8]
    token_examples = {t: tok(t).input_ids for t in TOKEN_EXAMPLES}
    log(f"tokenizer: vocab {vocab_size}, bos {bos_id}, eos {eos_id}, pad {pad_id}")
    for t, ids in token_examples.items():
        log(f"  {t!r:28} -> {ids}")

    # ---------------- text encoder (safetensors)
    te_cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=32, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, attention_dropout=0.0, dropout=0.0)
    te = CLIPTextModel(te_cfg).eval()
    n = reinit_(te, SEEDS["text_encoder"])
    te.save_pretrained(SD / "text_encoder", safe_serialization=True)
    log(f"text_encoder: {n} tensors, {sum(p.numel() for p in te.parameters())} params")

    # ---------------- VAE (torch pickle .bin on purpose)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    n = reinit_(vae, SEEDS["vae"])
    vae.save_pretrained(SD / "vae", safe_serialization=False)
    log(f"vae: {n} tensors, {sum(p.numel() for p in vae.parameters())} params")

    # ---------------- UNet (safetensors)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    n = reinit_(unet, SEEDS["unet"])
    unet.save_pretrained(SD / "unet", safe_serialization=True)
    log(f"unet: {n} tensors, {sum(p.numel() for p in unet.parameters())} params")

    # ---------------- scheduler + model_index (unused by PiSA, completes the layout)
    PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                  steps_offset=1, prediction_type="epsilon").save_pretrained(SD / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "_name_or_path": "tessera/sd21-tiny",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (SD / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")

    # ---------------- LoRA checkpoint (pisa_sr_tiny.pkl)
    lists = lora_module_lists(unet)
    log("LoRA modules per family:", {f: len(v) for f, v in lists.items()},
        "total", sum(len(v) for v in lists.values()))
    lora_unet = UNet2DConditionModel.from_pretrained(SD / "unet").eval()
    for br in BRANCHES:
        for fam in FAMILIES:
            lora_unet.add_adapter(
                LoraConfig(r=LORA_RANK, init_lora_weights="gaussian", target_modules=lists[fam]),
                adapter_name=adapter(fam, br))
    g = torch.Generator().manual_seed(SEEDS["lora"])
    gains = {"pix": LORA_GAIN_PIX, "sem": LORA_GAIN_SEM}
    with torch.no_grad():
        for name, p in lora_unet.named_parameters():   # deterministic module order
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "lora_B" in name:
                br = name.split(".")[-2].rsplit("_", 1)[1]
                p.copy_(torch.randn(p.shape, generator=g) * gains[br] / math.sqrt(p.shape[1]))
    state_dict_unet = {k: v.detach().clone().contiguous().float()
                       for k, v in lora_unet.state_dict().items() if "lora" in k}
    ckpt = {}
    for br in BRANCHES:
        for fam in FAMILIES:
            ckpt[f"unet_lora_{fam}_modules_{br}"] = list(lists[fam])
    ckpt["lora_rank_unet_pix"] = LORA_RANK
    ckpt["lora_rank_unet_sem"] = LORA_RANK
    ckpt["state_dict_unet"] = state_dict_unet
    torch.save(ckpt, OUT / "pisa_sr_tiny.pkl")
    n_modules = sum(len(v) for v in lists.values())
    assert len(state_dict_unet) == 4 * n_modules, (len(state_dict_unet), n_modules)
    base_keys = [k for k in lora_unet.state_dict() if "base_layer" in k]
    log(f"pisa_sr_tiny.pkl: {len(state_dict_unet)} lora tensors; "
        f"peft renames base weights e.g. {base_keys[0]}")
    del lora_unet

    # ---------------- LR image
    lr8 = make_lr_image(SEEDS["image"])
    Image.fromarray(lr8).save(OUT / "lr.png")

    # ================= reference maths, float64, from the files on disk =========
    lr_back = np.asarray(Image.open(OUT / "lr.png").convert("RGB"))
    assert lr_back.shape == (LR_H, LR_W, 3) and (lr_back == lr8).all()
    ref, diag = reference(lr_back, torch.float64, check_merge=True)
    eps_base, sat = ref["eps_base"], diag["saturated"]
    H, W = LR_H * UPSCALE, LR_W * UPSCALE
    PH, PW = diag["pad"]

    # feasibility: the same pipeline in plain f32 PyTorch against the f64 reference
    ref32, _ = reference(lr_back, torch.float32, check_merge=False)
    worst = {}
    for k, v in ref.items():
        group = k.split(".")[0]
        d = float((ref32[k].double() - v).abs().max())
        worst[group] = max(worst.get(group, 0.0), d)
    log("f32 PyTorch vs f64 reference, max abs per tensor group: "
        + ", ".join(f"{g} {d:.2e}" for g, d in worst.items()))

    # sanity
    eps_std = float(eps_base.std())
    assert 0.1 <= eps_std <= 2.0, eps_std
    assert sat < 0.9, sat
    assert float((ref["x.0"] - ref["x_vae"]).abs().max()) == 0.0

    meta = {
        "lambdas": json.dumps([list(p) for p in LAMBDAS]),
        "pad": json.dumps([PH, PW]),
        "out_size": json.dumps([H, W]),
        "lr_size": json.dumps([LR_H, LR_W]),
        "timestep": str(TIMESTEP),
        "scaling_factor": repr(SCALING_FACTOR),
        "lora_scale": repr(LORA_SCALE),
        "input_ids": json.dumps(input_ids),
        "token_examples": json.dumps(token_examples),
        "versions": json.dumps(versions),
        "note": "computed in float64 from the saved f32 weights, stored as f32; "
                "shapes NCHW; pad/out_size/lr_size are [height, width]",
    }
    save_file({k: v.float().contiguous() for k, v in ref.items()},
              OUT / "reference.safetensors", metadata=meta)
    canonicalise_safetensors_header(OUT / "reference.safetensors")

    log(f"\n{'tensor':18} {'shape':18} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}")
    for k, v in ref.items():
        log(f"{k:18} {str(list(v.shape)):18} {float(v.min()):10.5f} {float(v.max()):10.5f} "
            f"{float(v.mean()):10.5f} {float(v.std()):10.5f}")
    log("\nfiles:")
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.stat().st_size:10d}  {p.relative_to(OUT)}")
    log(f"  {total:10d}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
