"""The diffusion supervision branch on its own: components, MoE cross-attention, losses, seeding, LoRA."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from safetensors.torch import save_file
from test_model_fixtures import PIXEL_UNET, UNET, VAE, tiny_recipe
from torch import nn

from dsvlm.errors import RecipeError
from dsvlm.model.supervision.attention import MoECrossAttnProcessor, install_moe
from dsvlm.model.supervision.branch import DiffusionSupervision, timestep_bucket, timestep_buckets
from dsvlm.model.supervision.components import load_scheduler, load_unet, load_vae
from dsvlm.model.supervision.losses import _VGG16, ssim_loss
from dsvlm.recipe.schema import DiffusionConfig, SupervisionConfig

VISION, LLM = 32, 24


def branch(seed: int = 0, **options) -> DiffusionSupervision:
    return DiffusionSupervision(tiny_recipe(**options).supervision, VISION, LLM, seed=seed)


def conditions(model: DiffusionSupervision, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    widths = model.adapters.widths
    # connector and vision tokens differ in number, as they do in the VLM (no CLS in the connector output)
    return {name: torch.randn(n, 4 if name == "connector" else 5, w, generator=generator) for name, w in widths.items()}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_moe_branches_start_as_copies_of_the_text_kv_and_routers_mix_to_one() -> None:
    model = branch()
    assert model.condition_names == ["connector", "vision_1", "vision_3"]
    processors = [p for name, p in model.unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert processors and all(isinstance(p, MoECrossAttnProcessor) for p in processors)
    assert not any(isinstance(p, MoECrossAttnProcessor) for n, p in model.unet.attn_processors.items() if "attn1" in n)
    attn2 = [m for n, m in model.unet.named_modules() if n.endswith("attn2")]
    for attn, proc in zip(attn2, processors, strict=True):
        assert len(proc.to_k) == len(proc.to_v) == 2
        for k, v in zip(proc.to_k, proc.to_v, strict=True):
            assert torch.equal(k.weight, attn.to_k.weight) and torch.equal(v.weight, attn.to_v.weight)
            assert k.weight.data_ptr() != attn.to_k.weight.data_ptr()
        nn.init.normal_(proc.router.weight)
        weights = proc.route(torch.randn(5, 7, attn.to_q.out_features))
        assert weights.shape == (5, 3)
        assert torch.allclose(weights.sum(dim=1), torch.ones(5))


@pytest.mark.parametrize("loss", ["perceptual", "mae", "ssim", "eps_mse"])
def test_each_loss_gives_per_sample_values_and_trains_the_adapters(loss: str) -> None:
    model = branch(loss={loss: 2.0})
    out = model(conditions(model, 3), images(3), None, torch.arange(3))
    assert out["loss"].shape == out[loss].shape == (3,)
    assert torch.allclose(out["loss"], 2.0 * out[loss])
    assert torch.isfinite(out["loss"]).all() and (out[loss] >= 0).all()
    out["loss"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())
    assert all(p.grad is None for p in model.vae.parameters())


def test_vgg16_perceptual_loss_from_a_weights_file(tmp_path) -> None:
    layers, channels = [], 3  # a torchvision-layout `features` state dict, random weights
    for item in _VGG16:
        layers += [nn.MaxPool2d(2)] if item == "M" else [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU()]
        channels = int(item) if item != "M" else channels
    state = {f"features.{k}": v for k, v in nn.Sequential(*layers).state_dict().items()}
    save_file(state, tmp_path / "vgg16.safetensors")
    options = {
        "loss": {"perceptual": 1.0, "mae": 0.5},
        "perceptual_network": "vgg16",
        "perceptual_weights": str(tmp_path / "vgg16.safetensors"),
    }
    model = branch(**options)
    assert torch.equal(model.perceptual.features[0].weight, state["features.0.weight"])
    out = model(conditions(model, 2), images(2), None, torch.arange(2))
    assert torch.allclose(out["loss"], out["perceptual"] + 0.5 * out["mae"])
    out["loss"].sum().backward()
    assert model.perceptual.features[0].weight.grad is None
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RecipeError, match="lacks VGG16"):
        branch(**{**options, "perceptual_weights": str(tmp_path / "bad.pth")})


def test_pixel_space_branch_has_no_vae() -> None:
    model = branch(
        diffusion={"pretrained": None, "pixel_space": True, "unet_config": PIXEL_UNET, "num_train_timesteps": 100},
        loss={"ssim": 1.0, "eps_mse": 1.0},
    )
    assert model.vae is None
    x = images(2)
    assert torch.equal(model.encode(x), x)
    out = model(conditions(model, 2), x, None, torch.arange(2))
    assert out["loss"].shape == (2,)


def test_shared_cross_attention_keeps_the_standard_processor() -> None:
    model = branch(cross_attention="shared")
    assert model.moe == [] and all(isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values())
    out = model(conditions(model, 2), images(2), None, torch.arange(2))
    out["loss"].sum().backward()
    assert all(p.grad is not None for p in model.adapters.parameters())


def moe_parameters(model: DiffusionSupervision) -> int:
    """Trainable parameters added to the UNet's cross-attention (new K/V pairs, routers)."""
    return sum(p.numel() for proc in model.moe for p in proc.parameters() if p.requires_grad)


def test_shared_matched_has_the_capacity_of_moe_and_starts_as_shared() -> None:
    moe, matched, shared = (branch(cross_attention=kind) for kind in ("moe", "shared_matched", "shared"))
    assert moe_parameters(shared) == 0
    assert moe_parameters(matched) > 0
    assert abs(moe_parameters(matched) - moe_parameters(moe)) / moe_parameters(moe) < 0.05
    assert all(proc.router is None for proc in matched.moe)
    # Every new K/V pair starts as a copy of the original: averaged, the output is plain shared attention.
    inputs = conditions(shared, 2), images(2), None, torch.arange(2)
    assert torch.allclose(matched(*inputs)["loss"], shared(*inputs)["loss"], atol=1e-5)
    out = matched(*inputs)
    out["loss"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for proc in matched.moe for p in proc.to_k.parameters())


def test_single_branch_moe_equals_the_diffusers_attention_processor() -> None:
    """Oracle: with one condition, MoE cross-attention is exactly diffusers' own AttnProcessor2_0."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    hidden, condition = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    attn.set_processor(AttnProcessor2_0())
    expected = attn(hidden, encoder_hidden_states=condition)
    attn.set_processor(MoECrossAttnProcessor(attn, 1))
    assert torch.allclose(attn(hidden, encoder_hidden_states=(condition,)), expected, atol=1e-6)
    spatial = torch.randn(2, 32, 3, 4)  # the 4-D path a UNet block may take
    attn.set_processor(AttnProcessor2_0())
    expected = attn(spatial, encoder_hidden_states=condition)
    attn.set_processor(MoECrossAttnProcessor(attn, 1))
    assert torch.allclose(attn(spatial, encoder_hidden_states=(condition,)), expected, atol=1e-6)


def test_qformer_adapter_gives_a_fixed_number_of_queries_and_trains() -> None:
    model = branch(adapter="qformer", adapter_queries=6)
    conds = conditions(model, 2)
    adapted = model.adapters(conds)
    assert [a.shape for a in adapted] == [(2, 6, UNET["cross_attention_dim"])] * 3
    out = model(conds, images(2), None, torch.arange(2))
    out["loss"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())


def test_per_sample_seeds_make_losses_independent_of_the_batch() -> None:
    model = branch(loss={"mae": 1.0, "eps_mse": 1.0})
    cond, x, seeds = conditions(model, 3), images(3), torch.tensor([11, 22, 33])
    together = model(cond, x, None, seeds)["loss"]
    alone = model({k: v[1:2] for k, v in cond.items()}, x[1:2], None, seeds[1:2])["loss"]
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    again = model(cond, x, None, seeds)["loss"]
    assert torch.equal(together, again)
    other = model(cond, x, None, seeds + 1)["loss"]
    assert not torch.allclose(together, other)


def test_cached_latents_give_the_same_loss_as_encoding() -> None:
    model = branch(loss={"mae": 1.0})
    cond, x, seeds = conditions(model, 2), images(2), torch.arange(2)
    assert torch.allclose(model(cond, x, None, seeds)["loss"], model(cond, x, model.encode(x), seeds)["loss"])


def test_components_from_a_pretrained_diffusers_directory(tmp_path) -> None:
    unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    DDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    cfg = DiffusionConfig(pretrained=str(tmp_path))
    assert torch.equal(load_unet(cfg).conv_in.weight, unet.conv_in.weight)
    assert torch.equal(load_vae(cfg).encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert load_scheduler(cfg).config.num_train_timesteps == 50
    model = DiffusionSupervision(
        SupervisionConfig(diffusion=cfg, vision_layers=[1], loss={"mae": 1.0}, resolution=16), VISION, LLM
    )
    assert model.timestep_range == (0, 49)  # clipped to the schedule
    # frozen pretrained parts are reloaded from their source, never saved
    assert not any(k.startswith("vae.") for k in model.trainable_state_dict())
    assert all(".processor." in k for k in model.trainable_state_dict() if k.startswith("unet."))
    out = model(conditions(model, 2), images(2), None, torch.arange(2))
    assert torch.isfinite(out["loss"]).all()
    with pytest.raises(RecipeError, match="scheduler"):
        load_scheduler(DiffusionConfig(pretrained=str(tmp_path / "missing")))


def unet_output(model: DiffusionSupervision, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return model.unet(x, torch.tensor([20, 40]), encoder_hidden_states=model._encoder_states(cond)).sample


def test_unet_lora_starts_as_the_base_unet_and_a_step_moves_only_the_adapters() -> None:
    model = branch(seed=5, lora_rank=2)  # frozen UNet (the paper's setting) with MoE cross-attention
    cond = conditions(model, 2)
    base_weights = {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        at_init = unet_output(model, cond)
        model.unet.disable_adapters()
        base = unet_output(model, cond)
        model.unet.enable_adapters()
    torch.testing.assert_close(at_init, base, rtol=0, atol=0)  # B = 0

    # The targets are every attention layer's own q/k/v/out (self and cross), not the MoE processors' copies.
    lora = {n for n, _ in model.unet.named_parameters() if "lora_" in n}
    n_attention = sum(isinstance(m, Attention) for m in model.unet.modules())
    assert len(lora) == n_attention * 4 * 2 and not any(".processor." in n for n in lora)
    trainable = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    assert trainable == lora | {n for n in trainable if ".processor." in n}  # adapters + the new K/V, routers
    new = {id(p) for p in model.new_parameters()}
    assert all(id(p) in new for n, p in model.unet.named_parameters() if n in lora)

    optimizer = torch.optim.SGD([p for n, p in model.unet.named_parameters() if n in lora], lr=1.0)
    unet_output(model, cond).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(unet_output(model, cond), at_init, atol=1e-4)
        model.unet.disable_adapters()
        torch.testing.assert_close(unet_output(model, cond), base, rtol=0, atol=0)  # the base UNet is untouched
    for name, weight in base_weights.items():
        if ".processor." not in name:
            assert torch.equal(weight, dict(model.unet.named_parameters())[name]), name


def test_ddim_preview_samples_follow_their_seed_and_conditions() -> None:
    model = branch()
    cond = conditions(model, 2)
    out = model.sample(cond, steps=2)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(model.sample(cond, steps=2), out, rtol=0, atol=0)  # the preview grid is reproducible
    assert not torch.allclose(model.sample(cond, steps=2, seed=1), out)
    swapped = {k: v.flip(0) for k, v in cond.items()}  # same starting noise per slot, the other image's conditions
    assert not torch.allclose(model.sample(swapped, steps=2), out)


def test_mismatched_unet_channels_are_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="channels"):
        branch(diffusion={"pretrained": None, "unet_config": PIXEL_UNET, "vae_config": VAE})


def test_timestep_buckets_split_the_schedule() -> None:
    assert timestep_buckets(1000) == [(0, 249), (250, 499), (500, 749), (750, 999)]
    assert timestep_buckets(100)[-1] == (75, 99)
    for n in (1000, 999, 7):  # the ranges the metrics name are the buckets the losses are summed into
        t = torch.arange(n)
        for i, (lo, hi) in enumerate(timestep_buckets(n)):
            assert torch.equal((t >= lo) & (t <= hi), timestep_bucket(t, n) == i), (n, i)


@pytest.mark.parametrize("loss", ["mae", "eps_mse"])
def test_min_snr_weighting_scales_each_sample_by_its_noise_level(loss: str) -> None:
    options = {"loss": {loss: 1.0}, "timestep_range": [0, 99]}
    plain, weighted = branch(**options), branch(**options, timestep_weighting="min_snr", min_snr_gamma=2.0)
    inputs = conditions(plain, 6), images(6), None, torch.arange(6) * 7919
    a, b = plain(*inputs), weighted(*inputs)
    assert torch.equal(a["timesteps"], b["timesteps"])
    alpha = plain.alphas_cumprod[a["timesteps"]]
    snr = alpha / (1 - alpha)
    expected = snr.clamp(max=2.0) / (2.0 if loss == "mae" else snr)
    assert torch.allclose(b["loss"], a["loss"] * expected, rtol=1e-5)
    assert not torch.allclose(b["loss"], a["loss"])


def test_x0_clamp_bounds_the_decoded_one_step_estimate() -> None:
    pixel = {"pretrained": None, "pixel_space": True, "unet_config": PIXEL_UNET, "num_train_timesteps": 100}
    model = branch(diffusion=pixel, loss={"mae": 1.0}, x0_clamp=1e-6, timestep_range=[90, 99])
    x = images(2)
    out = model(conditions(model, 2), x, None, torch.arange(2))
    # x̂0 clamped to ~0: the reconstruction is flat grey whatever the UNet predicted.
    assert torch.allclose(out["mae"], x.abs().flatten(1).mean(dim=1), atol=1e-5)
    unclamped = branch(diffusion=pixel, loss={"mae": 1.0}, timestep_range=[90, 99])
    assert not torch.allclose(unclamped(conditions(model, 2), x, None, torch.arange(2))["mae"], out["mae"])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_recovery_inverts_the_schedulers_noising(kind: str) -> None:
    """Oracle: given diffusers' own target for each prediction type (the noise, `get_velocity`, the sample), the
    branch recovers exactly the noise and the clean latent that `add_noise` mixed."""
    model = branch()
    model.scheduler = DDPMScheduler.from_config(model.scheduler.config, prediction_type=kind)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    n = len(model.alphas_cumprod)
    t = torch.tensor([1, n // 3, 2 * n // 3, n - 1])
    noisy = model.scheduler.add_noise(latents, noise, t)
    target = {"epsilon": noise, "sample": latents}.get(kind)
    if target is None:
        target = model.scheduler.get_velocity(latents, noise, t)
    eps, x0 = model._eps_and_x0(target, noisy, model.alphas_cumprod[t].view(-1, 1, 1, 1))
    assert torch.allclose(eps, noise, atol=1e-3) and torch.allclose(x0, latents, atol=1e-3)


def test_moe_with_identical_conditions_equals_the_default_attention_processor() -> None:
    """Oracle: every new K/V pair starts as a copy of the original, so at init (any router, routed or not) MoE
    cross-attention over N copies of one condition is diffusers' default `AttnProcessor` over it."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    hidden, condition = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    attn.set_processor(AttnProcessor())
    expected = attn(hidden, encoder_hidden_states=condition)
    routed = MoECrossAttnProcessor(attn, 3)
    nn.init.normal_(routed.router.weight)  # a trained-looking router mixes copies: still the same output
    attn.set_processor(routed)
    assert torch.allclose(attn(hidden, encoder_hidden_states=(condition,) * 3), expected, atol=1e-5)
    attn.set_processor(MoECrossAttnProcessor(attn, 3, routed=False))
    assert torch.allclose(attn(hidden, encoder_hidden_states=condition), expected, atol=1e-5)
    # and the converse: a branch trained away from its copy changes the output
    routed.to_v[0].weight.data.add_(1.0)
    attn.set_processor(routed)
    assert not torch.allclose(attn(hidden, encoder_hidden_states=(condition,) * 3), expected, atol=1e-3)


def test_moe_unet_at_init_equals_the_stock_unet() -> None:
    torch.manual_seed(0)
    stock = UNet2DConditionModel(**UNET).eval()
    stock.set_attn_processor(AttnProcessor())
    moe = UNet2DConditionModel(**UNET).eval()
    moe.load_state_dict(stock.state_dict())
    install_moe(moe, 3)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    condition = torch.randn(2, 5, UNET["cross_attention_dim"])
    with torch.no_grad():
        expected = stock(x, t, encoder_hidden_states=condition).sample
        assert torch.allclose(moe(x, t, encoder_hidden_states=(condition,) * 3).sample, expected, atol=1e-5)


def _structured_images() -> torch.Tensor:
    """Gradients, a checkerboard, stripes and flat grey in [0, 1], (4, 3, 40, 48): SSIM's easy and hard cases."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    board = ((torch.arange(40)[:, None] // 4 + torch.arange(48)[None, :] // 4) % 2).float()
    stripes = (torch.sin(x * 30) + 1) / 2
    planes = [
        torch.stack([x, y, x * y]),
        board.expand(3, -1, -1),
        stripes.expand(3, -1, -1),
        torch.full((3, 40, 48), 0.5),
    ]
    return torch.stack(planes).double()


def test_ssim_loss_matches_a_reference_implementation() -> None:
    """Oracle: 1 - SSIM equals pytorch-msssim's SSIM (Wang et al.'s gaussian 11x11, σ 1.5, K 0.01/0.03)."""
    reference = pytest.importorskip("pytorch_msssim", reason="the dev extra installs pytorch-msssim")
    generator = torch.Generator().manual_seed(0)
    structured = _structured_images()
    noise = torch.rand(structured.shape, generator=generator, dtype=torch.float64)
    pairs = [
        (
            torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64),
            torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64),
        ),
        (structured, (structured + 0.1 * (noise - 0.5)).clamp(0, 1)),  # mildly noisy copies
        (structured, structured.roll(3, dims=-1)),  # shifted
        (structured, structured),  # identical: SSIM 1
    ]
    for a, b in pairs:
        expected = reference.ssim(a, b, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)
        ours = 1 - ssim_loss(a * 2 - 1, b * 2 - 1)
        # 2e-5: the reference builds its window in float32; a σ of 1.4, a 9-wide window or another K2 is off
        # by 6e-4 or more on these pairs
        assert torch.allclose(ours, expected, atol=2e-5), (ours, expected)
    assert torch.allclose(1 - ssim_loss(structured * 2 - 1, structured * 2 - 1), torch.ones(4, dtype=torch.float64))


def test_frozen_pretrained_weights_held_in_bf16_give_the_same_loss_and_gradients_under_autocast(tmp_path) -> None:
    UNet2DConditionModel(**UNET).save_pretrained(tmp_path / "unet")
    AutoencoderKL(**VAE).save_pretrained(tmp_path / "vae")
    DDPMScheduler(num_train_timesteps=50).save_pretrained(tmp_path / "scheduler")
    config = tiny_recipe(diffusion={"pretrained": str(tmp_path)}, loss={"perceptual": 1.0, "mae": 1.0}).supervision
    full, held = (DiffusionSupervision(config, VISION, LLM, seed=3) for _ in range(2))
    assert held.hold_frozen_in(torch.bfloat16) > 0
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    assert dtypes["unet.conv_in.weight"] == dtypes["vae.encoder.conv_in.weight"] == torch.bfloat16
    assert dtypes["vae.encoder.conv_norm_out.weight"] == torch.float32  # autocast keeps norms in fp32
    # the new K/V and routers inside the UNet, and the adapters, train in fp32
    assert all(dtypes[n] == torch.float32 for n, p in held.named_parameters() if p.requires_grad)
    assert any(".processor." in n for n, p in held.named_parameters() if p.requires_grad)
    cond, x, seeds = conditions(full, 2), images(2), torch.arange(2)
    losses = []
    for model in (full, held):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(cond, x, None, seeds)["loss"]
        loss.sum().backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(full.named_parameters(), held.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name
    # inline-config UNet and VAE weights are saved with the checkpoint: never cast
    inline = branch()
    assert inline.hold_frozen_in(torch.bfloat16) == 0
    assert all(p.dtype == torch.float32 for p in inline.parameters())
