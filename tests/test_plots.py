"""The report pictures (har_ref/eval/drawing.py, heatmaps.py, xy_charts.py, compare_viz.py): files are PNGs,
colours stand where they mean something, nothing is clipped."""
import numpy as np
import pytest
from PIL import Image, ImageFont

from har_ref.eval import compare_viz, drawing, heatmaps, xy_charts
from har_ref.eval.metrics import reliability_diagram_data, softmax

CLASSES = ("calling clapping cycling dancing drinking eating fighting hugging laughing "
           "listening_to_music running sitting sleeping texting using_laptop").split()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def count_color(region: np.ndarray, color) -> int:
    return int((region == np.array(color)).all(-1).sum())


def assert_png_with_white_border(path, image, border: int = 4):
    """PNG on disk, sane size, and no ink within `border` px of an edge (so no text was clipped)."""
    with Image.open(path) as on_disk:
        assert on_disk.format == "PNG" and on_disk.size == image.size
    assert 200 <= image.width <= 2400 and 200 <= image.height <= 3000
    a = pixels(image)
    for strip in (a[:border], a[-border:], a[:, :border], a[:, -border:]):
        assert (strip == 255).all()


def test_font_is_scalable_and_legible():
    f = drawing.font(16)
    assert isinstance(f, ImageFont.FreeTypeFont) and f.size == 16
    assert drawing.line_height(drawing.CELL_TEXT_PX) >= 14
    assert drawing.text_width("listening to music", 16) > drawing.text_width("eating", 16)


def test_colormap_is_monotonic_in_luminance():
    lum = [heatmaps._luminance(heatmaps.colormap(t)) for t in np.linspace(0, 1, 101)]
    assert all(a >= b for a, b in zip(lum, lum[1:])) and lum[0] - lum[-1] > 180


def test_confusion_cells_labels_and_scale(tmp_path):
    k = len(CLASSES)
    values = np.random.default_rng(0).permutation(np.linspace(0, 1, k * k)).reshape(k, k)
    path = tmp_path / "confusion.png"
    image, layout = heatmaps.plot_confusion(values, CLASSES, "Confusion matrix: CLIP", path)
    assert_png_with_white_border(path, image)
    a = pixels(image)

    # Cell colour (sampled off-centre, away from the value text) darkens as the value grows.
    samples = []
    for r in range(k):
        for c in range(k):
            left, top, _, _ = layout.cell_box(r, c)
            rgb = a[top + 3, left + 3]
            assert tuple(rgb) == heatmaps.colormap(values[r, c])
            samples.append((values[r, c], heatmaps._luminance(rgb)))
    lum = [l for _, l in sorted(samples)]
    assert all(x >= y for x, y in zip(lum, lum[1:])) and lum[0] - lum[-1] > 180

    # Value text: white on the darkest cell, black on the lightest.
    darkest, lightest = np.unravel_index(values.argmax(), values.shape), np.unravel_index(values.argmin(), values.shape)
    for cell, ink, absent in ((darkest, drawing.WHITE, drawing.BLACK), (lightest, drawing.FAINT_GREY, drawing.WHITE)):
        left, top, right, bottom = layout.cell_box(*cell)
        region = a[top:bottom, left:right]
        assert count_color(region, ink) > 5 and count_color(region, absent) == 0

    # The longest label ("listening to music") lies inside the canvas on both axes, and is drawn there.
    i = CLASSES.index("listening_to_music")
    for box in (layout.row_label_boxes[i], layout.col_label_boxes[i]):
        left, top, right, bottom = box
        assert 0 < left < right < image.width and 0 < top < bottom < image.height
        assert (a[top:bottom, left:right] < 100).all(-1).sum() > 50
    row_box, col_box = layout.row_label_boxes[i], layout.col_label_boxes[i]
    assert row_box[2] - row_box[0] == drawing.text_width("listening to music", drawing.TEXT_PX)
    assert col_box[3] - col_box[1] >= drawing.text_width("listening to music", drawing.TEXT_PX)

    # Colour bar: dark at the top (1.0), light at the bottom (0.0).
    left, top, right, bottom = layout.colorbar
    mid = (left + right) // 2
    assert heatmaps._luminance(a[top + 2, mid]) < 60 and heatmaps._luminance(a[bottom - 3, mid]) > 240


def test_confusion_rejects_mismatched_shape(tmp_path):
    with pytest.raises(ValueError, match="one label per row"):
        heatmaps.plot_confusion(np.eye(3), CLASSES, "x", tmp_path / "x.png")


def test_prompt_heatmap_spans_data_range(tmp_path):
    scores = np.array([[0.70, 0.75], [0.80, 0.90], [0.72, 0.85]])
    image, layout = heatmaps.plot_prompt_heatmap(
        scores, CLASSES[:3], ["a photo of a person {}.", "{}"], tmp_path / "p.png", "Prompt ablation: SigLIP"
    )
    assert_png_with_white_border(tmp_path / "p.png", image)
    a = pixels(image)
    corner = lambda r, c: tuple(a[layout.cell_box(r, c)[1] + 3, layout.cell_box(r, c)[0] + 3])
    assert corner(1, 1) == heatmaps.colormap(1.0) and corner(0, 0) == heatmaps.colormap(0.0)


def test_model_colors_are_fixed_and_distinct():
    colors = xy_charts.model_colors(["SigLIP (base, 224)", "CLIP (ViT-B/32)"])
    assert colors == {"SigLIP (base, 224)": xy_charts.SIGLIP_COLOR, "CLIP (ViT-B/32)": xy_charts.CLIP_COLOR}
    variants = xy_charts.model_colors(["CLIP zero-shot", "CLIP fine-tuned", "SigLIP"])
    assert len(set(variants.values())) == 3 and variants["CLIP zero-shot"] == xy_charts.CLIP_COLOR


def test_loss_curves_fall_and_keep_model_colours(tmp_path):
    path = tmp_path / "loss.png"
    curves = {"CLIP": [3.0, 2.0, 1.5, 1.2, 1.0], "SigLIP": [3.2, 1.8, 1.0, 0.6, 0.4]}
    image = xy_charts.plot_loss_curves(curves, path)
    assert_png_with_white_border(path, image)
    a = pixels(image)
    legend_bottom = drawing.MARGIN + drawing.line_height(drawing.TITLE_PX) + 10 + drawing.line_height(drawing.TEXT_PX) + 12
    for color in (xy_charts.CLIP_COLOR, xy_charts.SIGLIP_COLOR):
        ys, xs = np.nonzero((a[legend_bottom:] == np.array(color)).all(-1))  # the curve, not the legend swatch
        assert ys.size > 200
        early, late = xs < np.median(xs), xs >= np.median(xs)
        assert ys[early].mean() < ys[late].mean()  # loss falls: the line goes down the picture
    with pytest.raises(ValueError):
        xy_charts.plot_loss_curves({}, path)
    xy_charts.plot_loss_curves({"CLIP": [1.0]}, tmp_path / "one.png")  # a single constant epoch still draws


def test_epoch_time_bars_are_proportional(tmp_path):
    path = tmp_path / "times.png"
    image = xy_charts.plot_epoch_times({"CLIP (ViT-B/32)": 400.0, "SigLIP (base, 224)": 650.0}, path)
    assert_png_with_white_border(path, image)
    a = pixels(image)
    heights = {}
    for color in (xy_charts.CLIP_COLOR, xy_charts.SIGLIP_COLOR):
        mask = (a == np.array(color)).all(-1)
        column = mask[:, np.nonzero(mask.any(0))[0].mean().astype(int)]
        heights[color] = column.sum()
    assert heights[xy_charts.SIGLIP_COLOR] / heights[xy_charts.CLIP_COLOR] == pytest.approx(650 / 400, rel=0.01)


def test_reliability_diagram(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 15, 600)
    data = {}
    for name, boost in (("CLIP", 3.0), ("SigLIP", 1.0)):
        logits = rng.normal(size=(600, 15))
        logits[np.arange(600), y] += boost
        data[name] = reliability_diagram_data(softmax(logits), y)
    path = tmp_path / "rel.png"
    image = xy_charts.plot_reliability(data, path)
    assert_png_with_white_border(path, image)
    a = pixels(image)
    assert count_color(a, xy_charts.CLIP_COLOR) > 100 and count_color(a, xy_charts.SIGLIP_COLOR) > 100


def caption_rows(panel: Image.Image) -> list[np.ndarray]:
    """Caption lines of a compare panel: bands of rows holding non-white pixels below the image box."""
    caption = pixels(panel)[compare_viz.PANEL_PAD + compare_viz.PANEL_IMAGE_PX :]
    inked = (caption < 250).any(-1).any(-1)
    bands, start = [], None
    for i, ink in enumerate(np.r_[inked, False]):
        if ink and start is None:
            start = i
        elif not ink and start is not None:
            bands.append(caption[start:i])
            start = None
    return bands


def test_compare_panel_colours_each_caption_line():
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    panel = compare_viz.compare_panel(image, "using_laptop", {"CLIP": "texting", "SigLIP": "using_laptop"})
    gt, clip, siglip = caption_rows(panel)
    assert count_color(gt, drawing.BLACK) > 20
    assert count_color(gt, drawing.GREEN) == count_color(gt, drawing.RED) == 0
    assert count_color(clip, drawing.RED) > 20 and count_color(clip, drawing.GREEN) == 0
    assert count_color(siglip, drawing.GREEN) > 20 and count_color(siglip, drawing.RED) == 0
    # The image is scaled to fit 256 px, keeping its 2:1 aspect ratio.
    blue = (pixels(panel) == np.array([0, 0, 255])).all(-1)
    assert blue.any(0).sum() == 256 and blue.any(1).sum() == 128


def test_compare_panel_upscales_small_images_and_fits_long_captions():
    panel = compare_viz.compare_panel(Image.new("RGB", (32, 64), (0, 0, 255)), "listening_to_music",
                                {"SigLIP (base, 224) fine-tuned": "listening_to_music"})
    blue = (pixels(panel) == np.array([0, 0, 255])).all(-1)
    assert blue.any(1).sum() == 256 and blue.any(0).sum() == 128
    a = pixels(panel)
    assert (a[:, -4:] == 255).all() and panel.width > 256 + 2 * compare_viz.PANEL_PAD  # widened, not clipped


def test_compare_grid(tmp_path):
    right = compare_viz.compare_panel(Image.new("RGB", (100, 100), (10, 200, 10)), "calling", {"CLIP": "calling"})
    wrong = compare_viz.compare_panel(Image.new("RGB", (100, 50), (200, 10, 200)), "calling", {"CLIP": "texting"})
    path = tmp_path / "grid.png"
    image = compare_viz.compare_grid({"both right": [right, right], "both wrong": [wrong], "only CLIP right": []},
                               path, "CLIP vs SigLIP")
    assert_png_with_white_border(path, image)
    a = pixels(image)
    assert count_color(a, (10, 200, 10)) == 2 * 256 * 256 and count_color(a, (200, 10, 200)) == 256 * 128
    assert count_color(a, drawing.GREEN) > 20 and count_color(a, drawing.RED) > 20


def test_non_ascii_class_names_are_drawn_readably(tmp_path):
    """Pillow's bundled font has no accented letters: they are drawn unaccented, never as boxes. The
    confusion matrix of "café dancing" is, pixel for pixel, that of "cafe dancing" (or, with a font that
    draws é, the same name), and its labels are ink."""
    font = drawing.font(drawing.TEXT_PX)
    box = bytes(font.getmask("\U0010fffd"))  # a code point no font has: what a missing glyph looks like
    readable = "café" if bytes(font.getmask("é")) != box else "cafe"
    values = np.array([[0.75, 0.25], [0.4, 0.6]])
    accented, layout = heatmaps.plot_confusion(values, ["arm wrestling", "café dancing"], "Confusion: café",
                                               tmp_path / "accented.png")
    plain, _ = heatmaps.plot_confusion(values, ["arm wrestling", f"{readable} dancing"], f"Confusion: {readable}",
                                       tmp_path / "plain.png")
    assert accented.size == plain.size and (pixels(accented) == pixels(plain)).all()
    a = pixels(accented)
    for left, top, right, bottom in (layout.row_label_boxes[1], layout.col_label_boxes[1]):
        assert (a[top:bottom, left:right] < 100).all(-1).sum() > 50  # "cafe dancing" in black
