"""Reconstruction metrics of evaluate.py: pure functions of image batches (B, C, H, W) in [0, 1].

Reconstruction (images through encoder -> codebook -> decoder, clamped to [-1, 1] like a saved
picture), averaged over the images of the split:
  PSNR   10 log10(1 / MSE) per image in [0, 1] space (MSE floored at 1e-10, i.e. at most 100 dB);
  SSIM   Wang et al. 2004: 11 x 11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 1,
         over every position where the window fits ('valid', no padding), per channel, averaged;
         (their reference script also downsamples images above 256 px first; we do not);
  LPIPS  Zhang et al. 2018 v0.1 with the AlexNet trunk, the usual choice for reporting (the
         training loss uses VGG16); --no-lpips leaves it out;
  L1     mean absolute difference in [-1, 1] space.
On data with part maps (the mannequins) the same numbers are also split by region, because a
figure covers only about a tenth of a mannequin picture and a whole-image mean hides what
happens to the person: the figure is every pixel with a part label > 0, the backdrop the rest.
  figure / backdrop PSNR     the PSNR of the MSE over that region's pixels of each image;
  figure / backdrop colour   CIE76 colour difference: the mean over the region's pixels of the
                             Euclidean distance in CIELAB (sRGB, D65 white) between picture and
                             reconstruction. About 2.3 is a just-noticeable difference; above
                             about 10 two colours read as different colours.
Codebook (codebook_summary): the fraction of codes used on the split and the perplexity
exp(entropy) of their frequencies (codebook.CodebookStats); the histogram draws code frequencies
sorted from the most to the least used, so collapse shows as a short head and a long flat tail.
PSNR itself is utils.psnr (stage 1 validates with it too).
"""
import torch
import torch.nn.functional as F

from codebook import CodebookStats


def as_float64(t):
    """t in float64 for the metrics' sums; Apple's MPS has no float64: there by way of the CPU."""
    return (t.cpu() if t.device.type == "mps" else t).double()


def gaussian_window(size=11, sigma=1.5):
    """(size, size) Gaussian weights summing to 1."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-offsets**2 / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x, y, data_range=1.0, window_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity (Wang et al. 2004) per image, (B, C, H, W) -> (B,).

    Local means, variances and covariance come from a Gaussian window at every position where it
    fits inside the image; the SSIM map is averaged over positions and channels.
    """
    B, C, H, W = x.shape
    if min(H, W) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size} px, got {H}x{W}")
    x, y = as_float64(x), as_float64(y)
    window = gaussian_window(window_size, sigma).to(x.device).expand(C, 1, -1, -1)

    def local_mean(t):  # depthwise: each channel filtered on its own
        return F.conv2d(t, window, groups=C)  # (B, C, H - ws + 1, W - ws + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return ssim_map.flatten(1).mean(dim=1).float()


# sRGB (D65) -> CIE XYZ, IEC 61966-2-1; XYZ of the D65 white point with Y = 1
SRGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def srgb_to_lab(images):
    """CIELAB (L*, a*, b*) of sRGB pictures: (B, 3, H, W) in [0, 1] -> (B, 3, H, W), float64."""
    rgb = as_float64(images).clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", SRGB_TO_XYZ.to(rgb.device), linear)
    t = xyz / D65_WHITE.to(rgb.device)[:, None, None]
    epsilon = (6 / 29) ** 3  # below it the cube root is replaced by its tangent line
    f = torch.where(t > epsilon, t.clamp_min(epsilon) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]),
                        200 * (f[:, 1] - f[:, 2])], dim=1)


def region_metrics(x, y, figure):
    """PSNR and mean CIE76 difference over the figure's and the backdrop's pixels of each image.

    x, y (B, 3, H, W) in [0, 1]; figure (B, H, W) bool. -> dict of (B,) tensors; an image whose
    region is empty gets NaN there (callers average with nanmean).
    """
    delta_e = (srgb_to_lab(x) - srgb_to_lab(y)).norm(dim=1)  # (B, H, W)
    squared = (as_float64(x) - as_float64(y)).pow(2).mean(dim=1)  # (B, H, W), per-pixel MSE
    figure = figure.to(squared.device)
    out = {}
    for name, mask in (("figure", figure), ("backdrop", ~figure)):
        pixels = mask.flatten(1).sum(1).double()  # (B,)
        empty = pixels == 0
        pixels = pixels.clamp_min(1)
        mse = (squared * mask).flatten(1).sum(1) / pixels
        psnr = 10 * torch.log10(1 / mse.clamp_min(1e-10))
        colour = (delta_e * mask).flatten(1).sum(1) / pixels
        out[f"{name}_psnr_db"] = torch.where(empty, torch.nan, psnr).float()
        out[f"{name}_delta_e"] = torch.where(empty, torch.nan, colour).float()
    return out


def codebook_summary(counts):
    """A histogram of code indices (n_embed,) -> codes used, usage and perplexity."""
    stats = CodebookStats(len(counts))
    stats.counts = counts.cpu().long()
    return {"n_embed": len(counts), "codes_used": int((stats.counts > 0).sum()),
            "usage": stats.usage, "perplexity": stats.perplexity}
