"""The VAE latent cache, with a tiny AutoencoderKL built from a config."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from dsvlm.data.dataset import PreparedSplit
from dsvlm.data.geometry import SquareGeometry
from dsvlm.data.latents import LatentCache, build_latent_cache
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic
from dsvlm.errors import DataError
from dsvlm.model.supervision.vae import encode, vae_fingerprint, vae_input

PAD = SquareGeometry("pad", (122, 116, 104))


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, str]:
    out = tmp_path_factory.mktemp("latents") / "data"
    prepare_synthetic(out, SyntheticConfig(n_align=6, n_instruct=10, n_eval=2), progress=False)
    vae = tiny_vae()
    fingerprint = vae_fingerprint(vae)
    build_latent_cache(out, vae, 32, fingerprint, PAD, batch_size=4, progress=False)
    return out, vae, fingerprint


def test_fingerprint_tracks_config_and_weights() -> None:
    a, b = tiny_vae(0), tiny_vae(0)
    assert vae_fingerprint(a) == vae_fingerprint(b)
    assert vae_fingerprint(a) != vae_fingerprint(tiny_vae(1))
    with torch.no_grad():
        b.encoder.conv_in.bias[0] += 1e-3
    assert vae_fingerprint(a) != vae_fingerprint(b)
    c = tiny_vae(0)
    c.register_to_config(scaling_factor=0.25)
    assert vae_fingerprint(a) != vae_fingerprint(c)


def test_round_trip(cached: tuple[Path, object, str]) -> None:
    out, vae, fingerprint = cached
    dataset = PreparedDataset(out)
    cache = LatentCache.open(out, fingerprint, 32, PAD)
    with_images = [r for split in dataset.splits for r in dataset.records(split) if r["image"] is not None]
    assert len(cache) == len(with_images)
    assert cache.shape == (4, 16, 16)
    for record in with_images[:5] + with_images[-3:]:
        pixels = vae_input(PAD(dataset.load_image(record)), 32)
        assert pixels.shape == (3, 32, 32) and pixels.min() >= -1.0 and pixels.max() <= 1.0
        expected = encode(vae, pixels[None])[0]
        assert torch.allclose(cache.get(record["id"]), expected, atol=1e-5)
        assert torch.equal(cache.get(record["id"]), cache.get_image(record["image"]))
    # deterministic: the posterior mean, not a sample
    record = with_images[0]
    twice = [encode(vae, vae_input(PAD(dataset.load_image(record)), 32)[None]) for _ in range(2)]
    assert torch.equal(*twice)
    info = dataset.manifest["latents"]
    assert info == {
        "dir": "latents",
        "fingerprint": fingerprint,
        "resolution": 32,
        "geometry": PAD.key,
        "shape": [4, 16, 16],
        "images": len(with_images),
    }
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_prepared_split_serves_latents(cached: tuple[Path, object, str]) -> None:
    out, _, fingerprint = cached
    cache = LatentCache.open(out, fingerprint, 32, PAD)
    split = PreparedSplit(out, "align", latents=cache)
    item = split[2]
    assert torch.equal(item["latent"], cache.get(item["id"]))
    clone = pickle.loads(pickle.dumps(split))  # DataLoader workers: safetensors handles are reopened
    assert torch.equal(clone[2]["latent"], item["latent"])
    instruct = PreparedSplit(out, "instruct", latents=cache)
    assert all((it["latent"] is None) == (it["image"] is None) for it in instruct)


def test_mismatched_cache_is_refused(cached: tuple[Path, object, str]) -> None:
    out, _, fingerprint = cached
    other = vae_fingerprint(tiny_vae(1))
    with pytest.raises(DataError, match=r"built for another VAE.*dsvlm prepare latents"):
        LatentCache.open(out, other, 32, PAD)
    with pytest.raises(DataError, match=r"built at resolution 32, the recipe uses 64.*dsvlm prepare latents"):
        LatentCache.open(out, fingerprint, 64, PAD)
    with pytest.raises(DataError, match=r"image geometry pad\[122, 116, 104\], the recipe uses crop"):
        LatentCache.open(out, fingerprint, 32, SquareGeometry("crop"))


def test_missing_and_stale_cache(cached: tuple[Path, object, str], tmp_path: Path) -> None:
    out, _, fingerprint = cached
    with pytest.raises(DataError, match=r"no latent cache.*dsvlm prepare latents"):
        LatentCache.open(tmp_path, fingerprint, 32, PAD)
    cache = LatentCache.open(out, fingerprint, 32, PAD)
    first = PreparedDataset(out).records("align")[0]["image"]
    del cache.index["images"][first]
    with pytest.raises(DataError, match="not in the latent cache"):
        PreparedSplit(out, "align", latents=cache)
    with pytest.raises(DataError, match="no latent for record id"):
        cache.get("no-such-id")


def _edited_copy(cached_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the cached dataset whose latents/index.json went through `edit(index, latents_dir)`."""
    import shutil

    out = tmp_path / "data"
    shutil.copytree(cached_dir, out, symlinks=True)
    index_path = out / "latents" / "index.json"
    index = json.loads(index_path.read_text())
    edit(index, out / "latents")
    index_path.write_text(json.dumps(index))
    return out


def _cut_shard(index: dict, directory: Path) -> None:
    shard = directory / index["shards"][0]
    shard.write_bytes(shard.read_bytes()[:-64])


def _escape(index: dict, directory: Path) -> None:
    (directory.parent.parent / "elsewhere.safetensors").write_bytes((directory / index["shards"][0]).read_bytes())
    index["shards"][0] = "../../elsewhere.safetensors"


def _link_out(index: dict, directory: Path) -> None:
    (directory.parent.parent / "elsewhere.safetensors").write_bytes((directory / index["shards"][0]).read_bytes())
    (directory / "link.safetensors").symlink_to(directory.parent.parent / "elsewhere.safetensors")
    index["shards"][0] = "link.safetensors"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda index, _: index.update(shape=[4, 3, 3]), r"shape \[4, \d+, \d+\], but the index says \[4, 3, 3\]"),
        (lambda index, _: index["images"].update({next(iter(index["images"])): [0, 999]}), r"shard 0, row 999"),
        (lambda index, _: index["images"].update({next(iter(index["images"])): [3, 0]}), r"shard 3, row 0"),
        (
            lambda index, _: index.update(shards="shard-00000.safetensors"),
            r"index.json: not a valid LatentIndex \(shards",
        ),
        (lambda index, _: index.update(resolution="32"), r"not a valid LatentIndex \(resolution"),
        (lambda index, _: index.pop("images"), r"not a valid LatentIndex \(images: Field required"),
        (_cut_shard, r"shard-00000.safetensors: latent shard cannot be read"),
        (_escape, r"must be a path relative to the dataset, without '..'"),
        (_link_out, r"shards 'link.safetensors' resolves to .*elsewhere.safetensors, outside"),
    ],
)
def test_the_index_is_checked_against_the_shards(cached, tmp_path: Path, edit, message: str) -> None:
    cached_dir, _, fingerprint = cached
    out = _edited_copy(cached_dir, tmp_path, edit)
    with pytest.raises(DataError, match=message):
        LatentCache.open(out, fingerprint, 32, PAD)


def test_a_shard_cut_short_after_opening_is_a_clean_error(cached, tmp_path: Path) -> None:
    cached_dir, _, fingerprint = cached
    out = _edited_copy(cached_dir, tmp_path, lambda index, _: None)
    cache = LatentCache.open(out, fingerprint, 32, PAD)
    _cut_shard(cache.index, out / "latents")
    with pytest.raises(DataError, match=r"shard-00000\.safetensors: latent shard cannot be read"):
        cache.get_image(next(iter(cache.index["images"])))


def test_rebuild_replaces_the_cache(tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare_synthetic(out, SyntheticConfig(n_align=3, n_instruct=3, n_eval=1), progress=False)
    vae = tiny_vae()
    fingerprint = vae_fingerprint(vae)
    build_latent_cache(out, vae, 32, fingerprint, PAD, progress=False)
    manifest = build_latent_cache(out, vae, 16, fingerprint, PAD, progress=False)
    assert manifest["latents"]["resolution"] == 16
    assert json.loads((out / "latents" / "index.json").read_text())["resolution"] == 16
    assert LatentCache.open(out, fingerprint, 16, PAD).get("align-000000").shape == (4, 8, 8)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "latents"))) == ["latents"]


def test_cache_and_training_branch_share_the_shift_and_scale() -> None:
    """SD3/FLUX-style VAEs have a shift factor: the cache must apply it exactly as training does."""
    from dsvlm.model.supervision import branch

    vae = tiny_vae()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = encode(vae, pixels)
    vae.register_to_config(shift_factor=0.1)
    shifted = encode(vae, pixels)
    assert torch.allclose(plain - shifted, torch.full_like(plain, 0.1 * vae.config.scaling_factor), atol=1e-6)
    assert branch.encode_latents is encode  # the branch encodes with this same function
