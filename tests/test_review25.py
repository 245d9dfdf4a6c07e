"""Review of session 25: each test failed before its fix."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def fixed_size_vit(tmp_path_factory):
    """A ViT on 8×8 images whose processor does not resize (do_resize false), with one adapter."""
    from eval_fixtures import build_vit_classifier, save_peft_adapter
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("fixed_vit")
    base = build_vit_classifier(root / "base")
    ViTImageProcessor(size={"height": 8, "width": 8}, do_resize=False).save_pretrained(str(base))
    adapter = save_peft_adapter(base, root / "shapes", ["q_proj", "v_proj"], "AutoModelForImageClassification", None,
                                seed=5, head_modules=["classifier"])
    return base, adapter


def _image_folder(folder: Path, sizes: list[tuple[int, int]]) -> None:
    from PIL import Image

    for index, size in enumerate(sizes):
        (folder / ("circle", "square", "star")[index % 3]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (index * 40 % 256, 90, 200)).save(folder / ("circle", "square", "star")[index % 3]
                                                                 / f"{index}.png")


def _engine(fixed_size_vit, tmp_path, monkeypatch, sizes, **settings):
    """An Evaluator of the images; the base's weights must not load (the refusal comes first)."""
    from eval_fixtures import write_tasks_file

    from loramerge_cli import api
    from loramerge_cli.evaluation import engine

    base, adapter = fixed_size_vit
    _image_folder(tmp_path / "images", sizes)
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "image-classification",
                                                      "tasks": [{"name": "shapes", "data": {"validation": "images"}}]})

    def no_weights(*args, **kwargs):
        raise AssertionError("the base model's weights loaded before the refusal")

    monkeypatch.setattr(engine, "load_base", no_weights)
    return api.evaluate(spec, api.load_adapters([f"shapes={adapter}"]), settings=api.EvalSettings(threads=1,
                                                                                                  **settings))


def test_images_of_a_size_the_model_refuses_are_refused_before_the_weights_load(fixed_size_vit, tmp_path,
                                                                                 monkeypatch):
    """16×16 images for a ViT built for 8×8, with a processor that does not resize: the refusal came from the first
    forward pass, after the base model had loaded (minutes for a real one)."""
    from loramerge_cli.errors import LoramergeError

    with pytest.raises(LoramergeError, match=r"^task shapes: the model refuses its inputs: Input image size "
                                             r"\(16\*16\) doesn't match model \(8\*8\)"):
        _engine(fixed_size_vit, tmp_path, monkeypatch, [(16, 16)] * 3)


def test_images_of_several_sizes_in_one_batch_are_refused_before_the_weights_load(fixed_size_vit, tmp_path,
                                                                                   monkeypatch):
    from loramerge_cli.errors import LoramergeError

    with pytest.raises(LoramergeError, match=r"^task shapes: the images differ in size \(8×8, 9×9\)"):
        _engine(fixed_size_vit, tmp_path, monkeypatch, [(8, 8), (8, 8), (9, 9)])
    # one image per batch: the processor stacks nothing, and the model refuses the 9×9 one
    with pytest.raises(LoramergeError, match=r"^task shapes: the model refuses its inputs: Input image size \(9\*9\)"):
        _engine(fixed_size_vit, tmp_path / "single", monkeypatch, [(8, 8), (8, 8), (9, 9)], batch_size=1)


def test_images_the_model_takes_pass_the_check(fixed_size_vit, tmp_path, monkeypatch):
    """The check refuses nothing the model scores: 8×8 images load the weights (the patched loader says so)."""
    with pytest.raises(AssertionError, match="weights loaded"):
        _engine(fixed_size_vit, tmp_path, monkeypatch, [(8, 8)] * 3)


def test_checked_image_size_is_the_turned_image_size(tmp_path):
    """An EXIF orientation of 6 (a phone's portrait photo) turns an 8×16 image into a 16×8 one."""
    from PIL import Image

    from loramerge_cli.evaluation.batches import check_image, decoded_image

    image = Image.new("RGB", (8, 16))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    image.save(tmp_path / "plain.jpg")
    assert check_image(str(tmp_path / "photo.jpg")) == decoded_image(str(tmp_path / "photo.jpg")).size == (16, 8)
    assert check_image(str(tmp_path / "plain.jpg")) == (8, 16)
