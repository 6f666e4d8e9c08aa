import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mimkit.models.tokenizer import (
    DiscreteVAE,
    codebook_usage,
    dvae_loss,
    gumbel_temperature,
    psnr,
)


def _dvae(**kw) -> DiscreteVAE:
    args = dict(in_chans=3, vocab_size=32, hidden_dim=16, codebook_dim=8, downsample=8)
    return DiscreteVAE(**{**args, **kw})


@pytest.mark.parametrize(
    ("chans", "size", "downsample", "grid"),
    [
        (1, (28, 28), 4, (7, 7)),  # Fashion-MNIST-like: 7x7 grid = ViT patch 4 grid
        (3, (32, 32), 8, (4, 4)),
        (3, (16, 24), 4, (4, 6)),  # non-square
    ],
)
def test_shapes(chans, size, downsample, grid):
    torch.manual_seed(0)
    model = _dvae(in_chans=chans, downsample=downsample)
    x = torch.rand(2, chans, *size)
    assert model.token_grid(size) == grid
    out = model(x, temperature=1.0)
    assert out.recon.shape == x.shape
    assert out.logits.shape == (2, 32, *grid)
    assert out.soft_one_hot.shape == (2, 32, *grid)
    assert torch.allclose(out.soft_one_hot.sum(dim=1), torch.ones(2, *grid), atol=1e-5)
    assert out.recon.min() >= 0 and out.recon.max() <= 1
    ids = model.encode(x)
    assert ids.shape == (2, *grid) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < 32
    assert model.decode(ids).shape == x.shape


def test_hard_forward_gives_exact_one_hots():
    torch.manual_seed(0)
    model = _dvae()
    out = model(torch.rand(2, 3, 16, 16), temperature=0.5, hard=True)
    assert set(out.soft_one_hot.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out.soft_one_hot.sum(dim=1), torch.ones(2, 2, 2))


@pytest.mark.parametrize("hard", [False, True])
def test_gradient_reaches_encoder_through_gumbel_softmax(hard):
    torch.manual_seed(0)
    model = _dvae(downsample=4)
    x = torch.rand(2, 3, 16, 16)
    out = model(x, temperature=1.0, hard=hard)
    # reconstruction only: the encoder gets gradient solely through the relaxed sample
    F.mse_loss(out.recon, x).backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.codebook.weight.grad.abs().sum() > 0


def test_decode_of_encode_equals_decoder_on_hard_one_hot():
    torch.manual_seed(0)
    model = _dvae(downsample=4).eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        logits = model.encode_logits(x)  # (B, K, h, w)
        hard = F.one_hot(logits.argmax(dim=1), 32).permute(0, 3, 1, 2).float()
        expected = model.decode_one_hot(hard)
        got = model.decode(model.encode(x))
    assert torch.allclose(got, expected, atol=1e-6)
    # and a different code map decodes to a different image
    ids = model.encode(x)
    assert not torch.allclose(model.decode((ids + 1) % 32), got)


def test_dvae_loss_kl_zero_for_uniform_positive_otherwise():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    recon = torch.rand(2, 3, 8, 8)
    uniform = torch.full((2, 16, 2, 2), 3.7)
    loss = dvae_loss(recon, images, uniform, kl_weight=0.5)
    assert loss.kl.abs() < 1e-6
    assert torch.allclose(loss.recon, ((recon - images) ** 2).mean())
    assert torch.allclose(loss.total, loss.recon)

    peaked = torch.randn(2, 16, 2, 2) * 3
    loss = dvae_loss(recon, images, peaked, kl_weight=0.5)
    assert loss.kl > 0
    assert torch.allclose(loss.total, loss.recon + 0.5 * loss.kl)

    # a one-hot-like q has KL = log K, the maximum
    onehot = torch.full((1, 16, 1, 1), -1e4)
    onehot[0, 5] = 0.0
    loss = dvae_loss(recon[:1], images[:1], onehot, kl_weight=1.0)
    assert math.isclose(float(loss.kl), math.log(16), rel_tol=1e-5)


def test_dvae_loss_kl_matches_torch_kl_div():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 2, 4)
    x = torch.rand(3, 1, 4, 4)
    ours = dvae_loss(x, x, logits, kl_weight=1.0).kl
    q = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, 10)  # (cells, K)
    log_prior = torch.full_like(q, -math.log(10))
    ref = F.kl_div(log_prior, q, reduction="batchmean")  # sum q (log q - log p) / cells
    assert torch.allclose(ours, ref, atol=1e-6)


def test_psnr_hand_computed():
    target = torch.rand(2, 3, 8, 8) * 0.8
    assert torch.allclose(psnr(target + 0.1, target), torch.tensor(20.0), atol=1e-4)
    # per-image PSNR, then the mean: errors 0.1 (20 dB) and 0.01 (40 dB) -> 30 dB
    pred = target.clone()
    pred[0] += 0.1
    pred[1] += 0.01
    assert torch.allclose(psnr(pred, target), torch.tensor(30.0), atol=1e-3)
    assert torch.allclose(psnr(target + 25.5, target, data_range=255.0), torch.tensor(20.0))


def test_codebook_usage_hand_built():
    one = codebook_usage(torch.full((4, 3, 3), 7), 16)
    assert math.isclose(one.perplexity, 1.0)
    assert math.isclose(one.fraction_used, 1 / 16)
    uniform = codebook_usage(torch.arange(16).repeat(5).reshape(5, 4, 4), 16)
    assert math.isclose(uniform.perplexity, 16.0, rel_tol=1e-9)
    assert math.isclose(uniform.fraction_used, 1.0)
    half = codebook_usage(torch.tensor([0, 1, 0, 1]), 8)  # two codes equally: perplexity 2
    assert math.isclose(half.perplexity, 2.0, rel_tol=1e-9)
    assert math.isclose(half.fraction_used, 0.25)


def test_gumbel_temperature_schedule():
    kw = dict(start=1.0, end=1 / 16, anneal_steps=100)
    assert gumbel_temperature(0, **kw) == 1.0
    assert math.isclose(gumbel_temperature(100, **kw), 1 / 16)
    assert math.isclose(gumbel_temperature(50, **kw), 0.25)  # geometric midpoint
    assert gumbel_temperature(1000, **kw) == gumbel_temperature(100, **kw)
    taus = [gumbel_temperature(s, **kw) for s in range(101)]
    assert all(a > b for a, b in itertools.pairwise(taus))
    assert gumbel_temperature(0, anneal_steps=10) == 1.0  # DALL-E defaults 1 -> 1/16
    assert math.isclose(gumbel_temperature(10, anneal_steps=10), 1 / 16)


def _rectangles(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n RGB images: a dark background with one random axis-aligned colored rectangle each."""
    imgs = torch.zeros(n, 3, size, size)
    for i in range(n):
        y0, x0 = torch.randint(0, size - 4, (2,), generator=generator).tolist()
        hh, ww = torch.randint(4, size // 2 + 1, (2,), generator=generator).tolist()
        color = torch.rand(3, 1, 1, generator=generator)
        imgs[i, :, y0 : y0 + hh, x0 : x0 + ww] = color
    return imgs


@pytest.fixture
def one_thread():
    """Single-threaded: on a busy 2-core machine, 2 intra-op threads made this loop ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_halves_reconstruction_loss(one_thread):
    torch.manual_seed(0)
    images = _rectangles(16, 16, torch.Generator().manual_seed(0))
    model = _dvae(vocab_size=64, hidden_dim=32, codebook_dim=16, downsample=4, num_resblocks=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def hard_recon_mse() -> float:
        with torch.no_grad():
            return F.mse_loss(model.decode(model.encode(images)), images).item()

    before = hard_recon_mse()
    losses = []
    for step in range(100):
        tau = gumbel_temperature(step, start=1.0, end=1 / 16, anneal_steps=100)
        out = model(images, temperature=tau)
        loss = dvae_loss(out.recon, images, out.logits, kl_weight=1e-3)
        losses.append(loss.recon.item())
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    after = hard_recon_mse()  # the deterministic tokenize -> detokenize path improved too
    assert after < 0.5 * before, (before, after)
    # ... and clearly beats the best code-independent output (the mean image), so the tokens
    # carry content: a decoder that ignores its codes cannot pass (a sigmoid output, which
    # saturates here, ends just under the mean-image error)
    mean_image_mse = F.mse_loss(images.mean(0, keepdim=True).expand_as(images), images).item()
    assert after < 0.6 * mean_image_mse, (after, mean_image_mse)


def test_output_clamp_passes_gradient_when_out_of_range():
    torch.manual_seed(0)
    model = _dvae(downsample=4)
    with torch.no_grad():
        model.decoder[-1].bias.fill_(-10.0)  # every output pixel far below 0
    x = torch.full((1, 3, 16, 16), 0.5)
    out = model(x, temperature=1.0)
    assert torch.equal(out.recon, torch.zeros_like(x))  # clamped in value ...
    F.mse_loss(out.recon, x).backward()
    assert model.decoder[-1].bias.grad.lt(0).all()  # ... yet gradient descent raises the bias


def test_bad_arguments_raise():
    for bad in (0, 1, 3, 6, 12):
        with pytest.raises(ValueError, match="power of two"):
            _dvae(downsample=bad)
    with pytest.raises(ValueError, match="vocab_size"):
        _dvae(vocab_size=1)
    model = _dvae(downsample=8)
    with pytest.raises(ValueError, match="divisible"):
        model.token_grid(28)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 3, 32, 28), temperature=1.0)
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.rand(1, 3, 20, 32))
    with pytest.raises(ValueError, match="images must be"):
        model.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="temperature"):
        model(torch.rand(1, 3, 32, 32), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="anneal_steps"):
        gumbel_temperature(0, anneal_steps=0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(1, 4), torch.zeros(1, 4), data_range=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        dvae_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 1, 1),
                  kl_weight=-1.0)  # fmt: skip


def test_tokenizer_dry_run_describes_the_run_and_writes_nothing(tmp_path, capsys):
    from mimkit.cli import main
    from tests.conftest import ROOT

    recipe = ROOT / "configs" / "tokenizer" / "dvae_fmnist.yaml"
    args = ["tokenizer", "train", "-c", str(recipe), f"run.dir={tmp_path / 'r'}",
            "data.name=synthetic", "data.synthetic_size=512", "tokenizer.in_chans=3",
            "--dry-run"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dry run: TOKENIZER dVAE" in out and "512 images per epoch, 4 steps per epoch" in out
    assert not (tmp_path / "r").exists()
