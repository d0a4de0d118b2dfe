# %% [markdown]
# # Architecture: from a face crop to three heads
#
# The paper describes MTANet {cite:p}`zhang2020mtanet` in one paragraph (section III-A):
#
# > we employ SENet-50 as backbone to extract 2048-d features from input 112\*112 aligned face images. An average
# > pooling and max pooling layer with dropout and ReLU activation function followed by backbone tends to refine
# > stronger high-level features. This encoder eventually produces a 1024-d feature map after concatenation. [...]
# > In decoder model, we simply apply fully connected layer for each task.
#
# Its Fig. 1 ("The number represents output channel size") did not survive in the text we have, so this chapter
# states our reading of it, measures it, and keeps the alternatives as parameters. In the paper's configuration a
# batch of B faces flows like this (every shape below is measured further down):
#
# ```text
# B x 3 x 112 x 112   RGB in [0, 1]
#   normalise          buffers inside the model (ImageNet, or VGGFace2 for the paper's pretrained SENet-50)
#   backbone           SENet-50 (or ResNeXt-50, ResNeXt-50 + CBAM):
#                      stem 64x28x28, layer1 256x28x28, layer2 512x14x14, layer3 1024x7x7, layer4 2048x4x4
#   neck               global average pool 2048 - dropout - Linear 2048->512 - ReLU --+
#                      global max pool     2048 - dropout - Linear 2048->512 - ReLU --+-- concat: 1024
#   heads              Linear 1024->2, tanh    valence, arousal in [-1, 1]
#                      Linear 1024->8          AU logits
#                      Linear 1024->7          expression logits
# ```
#
# The backbones come from timm {cite:p}`rw2019timm`, built without their pooling and classifier. Nothing here is
# downloaded: every network in this chapter is randomly initialised unless `weights_path` names a checkpoint.

# %% tags=["parameters", "hide-input"]
data_root: str = ""  # an Aff-Wild2 root; empty means the synthetic twin of size synth_size (written on first use)
synth_size: str = "smoke"  # smoke, cpu or gpu: which synthetic set an empty data_root stands for
backbone: str = "senet18"  # traced stage by stage and shows its SE gates; senet50 is the paper's
cbam_backbone: str = "resnet18_cbam"  # shows its CBAM maps; resnext50_cbam is the paper's
backbones: list = ["senet18", "seresnet18", "resnet18_cbam", "resnext26", "senet50"]  # sized and costed; empty: all
pooling: str = "avgmax_concat"  # neck of the traced networks: avgmax_concat (our reading), avg or avgmax_add
edition: str = ""  # heads of the traced networks: 2020, 2021 or 2022; empty means the edition of the data
image_size: int = 112  # side of the square input (the paper: 112)
batch_size: int = 6  # real faces traced through the networks
weights_path: str = ""  # a checkpoint written by mtanet.models.save_checkpoint; empty means random weights
seed: int = 0  # for the random initialisation and the choice of faces

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display

from mtanet import synth
from mtanet.data import FrameDataset, load_frames, stats
from mtanet.models import BACKBONES, PAPER_BACKBONES, POOLING_MODES, MTANet, load_model
from mtanet.models import inspect as im
from mtanet.tasks import EDITIONS

sns.set_theme(context="notebook", style="whitegrid")
root = synth.resolve_data_root(data_root, synth_size)
is_synthetic = (root / synth.MANIFEST_FILE).exists()
val = load_frames(root, "val")
ed = EDITIONS[edition or val.attrs["edition"]]
if ed.name != val.attrs["edition"]:
    raise ValueError(f"edition {ed.name} asked for, but the data at {root} is ABAW {val.attrs['edition']}")
backbones = list(backbones) or list(BACKBONES)
if pooling not in POOLING_MODES:
    raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")

# one face per annotated name (a person in a video), then batch_size of those
with_image = val[val["image"] != ""]
pool = with_image.groupby("name", group_keys=False).sample(1, random_state=seed)
faces = stats.sample_rows(pool, batch_size, seed=seed, au_names=ed.au_names)
dataset = FrameDataset(faces, root, ed.au_names, image_size=image_size)
batch = torch.stack([dataset[i][0] for i in range(len(dataset))])

# %% [markdown]
# The network: the checkpoint named by `weights_path`, or a freshly initialised MTANet with the heads of the data's
# edition.

# %%
trained = load_model(weights_path) if weights_path else None
if trained is not None and trained.config["backbone"] != cbam_backbone:
    backbone = trained.config["backbone"]  # a checkpoint decides which network is traced


def network(name: str) -> MTANet:
    """The checkpoint when it holds this backbone, else a randomly initialised MTANet with the chapter's heads."""
    if trained is not None and trained.config["backbone"] == name:
        return trained
    torch.manual_seed(seed)
    return MTANet(name, num_outputs=ed.num_outputs, pooling=pooling).eval()


model = network(backbone)

# %% tags=["remove-input"]
display(Markdown(
    f"**Data:** `{root.name}`, ABAW {ed.name} "
    + ("(**synthetic**: SynthAffWild, not real faces)" if is_synthetic else "(real data)")
    + f"; a batch of {len(batch)} validation faces from different names, at {image_size}x{image_size}. "
    + "**Weights:** " + (f"`{weights_path}` ({trained.config['backbone']})" if trained is not None
                          else "none: every network below is randomly initialised (untrained).")))

# %% [markdown]
# ## The input contract
#
# The model takes float RGB images in [0, 1], `(B, 3, H, W)`, and normalises them itself: the mean, the standard
# deviation and a scale are buffers of the model, so they are saved in every checkpoint and travel with the weights.
# No data loader, evaluation script or demo has to know which preset the weights were trained with. Two presets
# exist (`mtanet.models.NORMALIZATIONS`):
#
# - `imagenet`: timm's ImageNet statistics, `(x - mean) / std`, for backbones initialised from timm weights.
# - `vggface2`: the Caffe convention of the VGGFace2 SENet-50 that the paper starts from, `255 x - mean` with no
#   division. The Caffe original reads BGR images; `convert_senet50_ft` reverses the input channels of the first
#   convolution, so the converted network reads RGB like everything else here and the mean is given in RGB order.
#
# What the two ends of the [0, 1] range become under each preset:

# %% tags=["hide-input"]
norms = im.normalization_table()
display(norms.rename(columns={"at_0": "x = 0 becomes", "at_1": "x = 1 becomes"}).style.format(
    {"scale": "{:g}", "mean": "{:.4f}", "std": "{:.3f}", "x = 0 becomes": "{:+.2f}", "x = 1 becomes": "{:+.2f}"}))
print(f"this chapter's networks use: {model.config['input_norm']}")

# %% [markdown]
# The real batch that is traced through the networks below ({numref}`fig-02-faces`):

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, len(batch), figsize=(1.6 * len(batch), 1.9))
for ax, img, (_, row) in zip(np.atleast_1d(axes), batch, faces.iterrows()):
    ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_title(row["name"], fontsize=6)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-02-faces)=
# The batch of validation faces traced through every network of this chapter, one per annotated name, as the model
# receives them (RGB in [0, 1], before its own normalisation).

# %% [markdown]
# ## Shapes, parameters and multiply-adds at each stage
#
# Forward hooks record the shape that enters and leaves every part of the network on the batch above, and a FLOP
# counter (`torch.utils.flop_counter`, convolutions and matrix products only) attributes the multiply-accumulates
# (MACs, per image) to each part. The rows partition the network: their parameters and MACs add up to the whole.
# Shapes are per image, without the batch dimension. {numref}`fig-02-shares` shows where the parameters and the
# multiply-adds sit.

# %% tags=["hide-input"]
stages = im.stage_table(model, batch)
total_params, total_macs = stages["parameters"].sum(), stages["macs"].sum()
display(Markdown(f"**{backbone}**, pooling `{model.config['pooling']}`, heads of ABAW {ed.name}: "
                 f"{total_params / 1e6:.2f} M parameters, {total_macs / 1e9:.3f} G MACs per {image_size}px image."))
display(stages.rename(columns={"input": "input shape", "output": "output shape", "macs": "MACs"})
        .style.format({"parameters": "{:,}", "MACs": "{:,}"}).hide(axis="index"))

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
share = stages.set_index("part")[["parameters", "macs"]] / [total_params, total_macs] * 100
for ax, column, label in zip(axes, share.columns, ("parameters", "multiply-adds")):
    share[column].iloc[::-1].plot.barh(ax=ax, color="tab:blue")
    ax.set(xlabel=f"share of {label} (%)", ylabel="", title=f"Where the {label} are")
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-02-shares)=
# Each part of the traced network as a share of its parameters (left) and of its multiply-adds per image (right),
# from the table above.

# %% tags=["remove-input"]
last_stage = stages["part"].iloc[4]
display(Markdown(
    f"Each stage halves the side of the map and doubles the channels (in the 50-layer networks, 256 to 2048), so "
    f"the multiply-adds are spread over the four stages while the parameters pile up at the end: {last_stage} holds "
    f"{share.loc[last_stage, 'parameters']:.0f}% of the parameters and {share.loc[last_stage, 'macs']:.0f}% of the "
    f"multiply-adds. At {image_size}x{image_size} the backbone's overall stride of 32 leaves a "
    f"{stages['output'].iloc[4].split('x', 1)[1]} map, so the neck's max pooling picks the largest of only "
    f"{np.prod([int(v) for v in stages['output'].iloc[4].split('x')[1:]])} positions per channel (49 at 224x224)."))

# %% [markdown]
# Backbones from the ResNet family end every block with a ReLU, so the map the neck sees is non-negative; a ReLU
# placed directly after the pooling would therefore change nothing. The check on this batch:

# %%
with torch.no_grad():
    fmap = model.backbone.forward_features(model.normalize(batch))
print(f"backbone output {tuple(fmap.shape)}, smallest value {fmap.min().item():.4f}, "
      f"share of zeros {(fmap == 0).float().mean().item():.1%}")

# %% [markdown]
# ## Size and cost of each backbone
#
# Every registered backbone, built with the paper's heads (2, 8 and 7 outputs) and the default neck, at
# `image_size`. The three networks of the paper's Table I are marked; the 18- and 26-layer ones are small members of
# the same families, used for tests and quick runs only; {numref}`fig-02-costs` compares them.

# %% tags=["hide-input"]
paper_names = {"resnext50": "ResNeXt-50", "resnext50_cbam": "ResNeXt-50 + CBAM", "senet50": "SENet-50"}
rows = []
for name in backbones:
    torch.manual_seed(seed)
    net = MTANet(name)
    kinds = {kind.split("_")[0] for _, kind, _ in im.attention_modules(net.backbone)}
    rows.append(dict(backbone=name, timm_model=BACKBONES[name]["model_name"], attention=" ".join(kinds) or "none",
                     paper=paper_names.get(name, ""), **im.model_costs(net, image_size)))
    del net
costs = pd.DataFrame(rows).set_index("backbone")
costs["params_M"] = costs["params_total"] / 1e6
costs["GMACs"] = costs["macs"] / 1e9
display(costs[["timm_model", "attention", "paper", "feature_map", "params_backbone", "params_neck", "params_heads",
               "params_M", "GMACs"]].style.format({"params_backbone": "{:,}", "params_neck": "{:,}",
                                                   "params_heads": "{:,}", "params_M": "{:.2f}", "GMACs": "{:.3f}"}))

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
colors = ["tab:red" if name in PAPER_BACKBONES else "tab:gray" for name in costs.index]
for ax, column, label in zip(axes, ("params_M", "GMACs"),
                             ("parameters (millions)", f"G MACs per {image_size}px image")):
    ax.barh(costs.index[::-1], costs[column].iloc[::-1], color=colors[::-1])
    ax.set(xlabel=label)
axes[0].set_title("Size (red: the paper's backbones)")
axes[1].set_title("Cost of one forward pass")
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-02-costs)=
# Parameters (left) and multiply-adds of one forward pass (right) of every backbone built with the paper's heads;
# red bars are the three backbones of the paper's Table I.

# %% tags=["remove-input"]
notes = []
if {"resnext50", "resnext50_cbam"} <= set(costs.index):
    extra = costs.loc["resnext50_cbam", "params_total"] - costs.loc["resnext50", "params_total"]
    notes.append(f"CBAM adds {extra / 1e6:.2f} M parameters to ResNeXt-50 "
                 f"({extra / costs.loc['resnext50', 'params_total']:.0%}) and "
                 f"{(costs.loc['resnext50_cbam', 'macs'] / costs.loc['resnext50', 'macs'] - 1):.1%} MACs.")
if {"senet50", "seresnet50"} <= set(costs.index):
    notes.append("`senet50` (timm's `legacy_seresnet50`, the layout of the VGGFace2 weights) and `seresnet50` have the "
                 "same parameters but put the stride of each downsampling block on the 1x1 instead of the 3x3 "
                 f"convolution: {costs.loc['senet50', 'GMACs']:.3f} vs {costs.loc['seresnet50', 'GMACs']:.3f} G MACs.")
neck_share = costs["params_neck"] / costs["params_total"]
notes.append(f"The neck holds {neck_share.min():.0%} to {neck_share.max():.0%} of the parameters, the three heads "
             f"{costs['params_heads'].iloc[0]:,} in all.")
display(Markdown("\n".join(f"- {n}" for n in notes)))

# %% [markdown]
# ## Attention: squeeze-and-excitation and CBAM
#
# Both modules rescale the output of a residual branch before it is added back to the shortcut.
#
# **Squeeze-and-excitation** {cite:p}`hu2018senet` learns one weight per channel from the whole map. *Squeeze*:
# average each of the C channels over all positions, giving a C-vector that describes the image globally.
# *Excite*: a two-layer bottleneck (C to C/16, ReLU, C/16 to C) and a sigmoid turn it into C gates in (0, 1), and
# every channel of the map is multiplied by its gate. The gates depend on the input, so the block can switch
# feature detectors up or down per image. The cost is two small matrix products per block.
#
# **CBAM** {cite:p}`woo2018cbam` applies two gates in a row. The channel gate is SE with a second descriptor: the
# same bottleneck is applied to the average-pooled and to the max-pooled vector, and the two outputs are summed
# before the sigmoid. The spatial gate then pools across channels instead: at every position the channel average
# and the channel maximum form a 2-channel map, a 7x7 convolution (and batch norm) turns it into one map, and its
# sigmoid, one value in (0, 1) per position, multiplies every channel there. In timm's ResNeXt the module sits after
# the last batch norm of each block, before the addition, as in the CBAM paper.
#
# The gates below are captured with forward hooks on each module's sigmoid, on the batch of faces shown above.
#
# ```{note}
# Unless `weights_path` points to a trained checkpoint, these networks are **untrained**: their gates show the
# mechanism (what is computed, at which resolution, in which range), not what a trained MTANet attends to. They run
# in eval mode, as at test time, where an untrained network's batch norms still hold their initial statistics and
# do not normalise, so activations, and with them some gates, can grow to the ends of (0, 1).
# ```

# %% tags=["hide-input"]
is_trained = trained is not None and trained is model
se_model = network(backbone)  # a copy of the traced network (or the checkpoint), so that the traced one stays as built
zeroed = im.undo_zero_init_last(se_model)  # timm's seresnet starts each SE behind a zero batch norm: see CBAM below
se_records = [r for r in im.capture_attention(se_model, batch) if r.kind == "se"]
se_summary = im.gate_summary(se_records)
if se_summary.empty:
    display(Markdown(f"`{backbone}` has no squeeze-and-excitation modules; choose `senet50`, `seresnet50`, `senet18` "
                     "or `seresnet18` as `backbone` to see SE gates."))
else:
    if zeroed:
        print(f"{len(zeroed)} batch norms in front of SE modules set from 0 to 1")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    values = pd.DataFrame([dict(block=f"{r.stage}.{r.block}", stage=r.stage, gate=v)
                           for r in se_records for v in r.gate.numpy().ravel()])
    sns.boxplot(values, x="block", y="gate", hue="stage", ax=axes[0], fliersize=1, linewidth=0.8, legend=False)
    axes[0].set(ylim=(0, 1), ylabel="SE gate", title=f"SE gates per block ({backbone}, images x channels)")
    axes[0].tick_params(axis="x", rotation=90)
    labels = se_summary["stage"] + "." + se_summary["block"].astype(str)
    axes[1].plot(labels, se_summary["across_channels"], marker="o", label="across channels (batch mean)")
    axes[1].plot(labels, se_summary["across_images"], marker="o", label="across images (mean over channels)")
    axes[1].set(ylabel="standard deviation of the gate", title="How the gates vary", ylim=(0, None))
    axes[1].tick_params(axis="x", rotation=90)
    axes[1].legend(fontsize=8)
    plt.tight_layout()
    plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-02-se)=
# Squeeze-and-excitation gates of every block of the traced backbone on the batch of faces: their spread over images
# and channels per block (left), and how much they vary from channel to channel and from face to face (right).

# %% tags=["remove-input"]
if not se_summary.empty:
    ratio = (se_summary["across_channels"] / se_summary["across_images"]).median()
    display(Markdown(
        f"In this {'trained' if is_trained else 'untrained'} network the gates of a block differ "
        f"{ratio:.0f} times more from channel to channel than from face to face (median over blocks): "
        + ("a random bottleneck acts mostly as a fixed rescaling of each channel, and the dependence on the "
           "input that SE is built for has yet to be learned." if not is_trained else
           "compare with an untrained network (empty `weights_path`).")))

# %% [markdown]
# ### CBAM's spatial maps
#
# A freshly built timm ResNet or ResNeXt starts every residual branch with its last batch norm scaled to zero
# (`zero_init_last`), so that each block begins as the identity. The CBAM module comes right after that batch norm,
# so in a fresh network it sees only zeros: every channel gate and every position of every spatial map is exactly
# sigmoid(0) = 0.5. The check, then the maps once those scales are set back to 1 (`undo_zero_init_last`), which gives
# the random attention modules real features to react to. A trained network has no all-zero batch norm and is left
# unchanged.

# %% tags=["hide-input"]
cbam = network(cbam_backbone)
fresh = im.capture_attention(cbam, batch)
if not any(r.kind == "cbam_spatial" for r in fresh):
    display(Markdown(f"`{cbam_backbone}` has no CBAM modules; choose `resnext50_cbam` or `resnet18_cbam`."))
else:
    furthest = max((r.gate - 0.5).abs().max().item() for r in fresh)
    zeroed = im.undo_zero_init_last(cbam) if cbam is not trained else []
    print(f"{cbam_backbone} as built: largest distance of any CBAM gate from 0.5 = {furthest:.2g}; "
          f"batch norms set from 0 to 1: {len(zeroed)}")
    cbam_records = im.capture_attention(cbam, batch)
    spatial = [r for r in cbam_records if r.kind == "cbam_spatial"]
    last = {r.stage: r for r in spatial}  # the last block of each stage
    n_img = min(len(batch), 6)
    fig, axes = plt.subplots(n_img, len(last) + 1, figsize=(1.6 * (len(last) + 1), 1.75 * n_img), squeeze=False)
    for i in range(n_img):
        face = batch[i].permute(1, 2, 0).numpy()
        gray = face @ np.array([0.299, 0.587, 0.114], dtype=face.dtype)
        axes[i, 0].imshow(face)
        for j, (stage, r) in enumerate(last.items(), start=1):
            ax = axes[i, j]
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
            ax.imshow(im.upsample_maps(r.gate[i:i + 1], face.shape[0])[0], cmap="turbo", alpha=0.5)
            g = r.gate[i]
            ax.set_title(f"{g.min():.3f} to {g.max():.3f}", fontsize=7)
            if i == 0:
                ax.text(0.5, 1.25, f"{r.stage}.{r.block} ({g.shape[0]}x{g.shape[1]})",
                        transform=ax.transAxes, ha="center", fontsize=8, weight="bold")
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].set_title("input", fontsize=8, weight="bold")
    fig.suptitle(f"CBAM spatial gates of {cbam_backbone}, last block of each stage\n"
                 "(colour scale per map, blue low to red high; above each map: its range)", y=1.0, fontsize=10)
    plt.tight_layout()
    plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-02-cbam)=
# CBAM spatial gates of the last block of each stage over each face of the batch (colour scale per map, blue low to
# red high; above each map, its range).

# %% tags=["remove-input"]
if any(r.kind == "cbam_spatial" for r in fresh):
    cbam_summary = im.gate_summary(cbam_records)
    display(Markdown(
        f"The spatial gates of the last block of each stage, bilinearly upsampled from their own resolution "
        f"({', '.join(f'{r.gate.shape[-1]}x{r.gate.shape[-1]}' for r in last.values())}) to the face. "
        f"Across all blocks the spatial gates range from {min(r.gate.min().item() for r in spatial):.3f} to "
        f"{max(r.gate.max().item() for r in spatial):.3f}, the channel gates from {cbam_summary['min'].min():.3f} "
        f"to {cbam_summary['max'].max():.3f}. "
        + ("With random weights the maps react to image structure through random filters; they say nothing about "
           "which facial regions matter for affect."
           if cbam is not trained else "These are the gates of the trained checkpoint.")))

# %% [markdown]
# ## The neck: our reading of the paper
#
# "An average pooling and max pooling layer with dropout and ReLU activation function [...] produces a 1024-d
# feature map after concatenation." Two readings are excluded by arithmetic and by the check above: concatenating
# the two pooled 2048-d vectors gives 4096, not 1024; and a ReLU directly after pooling a non-negative map does
# nothing. So each branch needs a learned projection before its ReLU, and two branches concatenated to 1024 are
# 512 wide each. Our reading, `avgmax_concat`, and the two alternatives kept as the `pooling` parameter
# (`mtanet.models.PoolingNeck`; GAP and GMP are global average and global max pooling over the h x w positions):
#
# | `pooling` | average branch | max branch | 1024-d shared feature |
# |---|---|---|---|
# | `avgmax_concat` (default) | GAP, dropout, Linear C to 512, ReLU | GMP, dropout, Linear C to 512, ReLU | concat |
# | `avg` | GAP, dropout, Linear C to 1024, ReLU | none | the branch |
# | `avgmax_add` | (GAP + GMP) / 2, dropout, Linear C to 1024, ReLU | (in the sum) | the branch |
#
# Measured for the traced backbone (C is its number of output channels):

# %% tags=["hide-input"]
necks = im.neck_table(model.backbone.num_features, model.neck.out_features, int(fmap.shape[-1]))
display(necks.style.format({"parameters": "{:,}"}))

# %% [markdown]
# All three necks have the same number of weights: they differ in what is pooled and whether the two poolings are
# projected separately, not in size. The paper also tried "stacking deeper linear layers" and found that this
# "increases parameters and cast no influence on result", so we keep a single linear layer per branch and per head.
# Concatenating the raw poolings (4096) and projecting them with one linear layer is a further reading we did not
# implement: it sums two projections instead of concatenating them.

# %% [markdown]
# ## Heads and outputs per edition
#
# One linear layer per task reads the shared feature. The VA head goes through tanh, so valence and arousal are in
# [-1, 1] like their labels; AU and expression heads return logits: the losses take logits, and `mtanet.models.probabilities` turns them into
# probabilities for scoring and prediction. The head widths follow the edition of the data (`mtanet.tasks.EDITIONS`): ABAW 2021 annotates 12 AUs, and
# from 2022 the expression task adds the class Other.

# %%
heads = im.heads_table(model.neck.out_features)
display(heads.style.format({"head_parameters": "{:,}"}))
with torch.no_grad():
    outputs = model(batch)
print("outputs on the batch:", {task: tuple(out.shape) for task, out in outputs.items()})
if "va" in outputs:
    print(f"VA range: {outputs['va'].min().item():+.3f} to {outputs['va'].max().item():+.3f}")
head_params = sum(p.numel() for p in model.heads.parameters())
display(Markdown(
    f"The heads of the traced network hold {head_params:,} parameters, {head_params / total_params:.2%} of the "
    "total: almost all of MTANet is the shared encoder, which is what makes the hard parameter sharing of the paper "
    "cheap. How the three losses pull on that shared encoder is the subject of the training chapters."))

# %% [markdown]
# ## Where the code lives
#
# The package is laid out like this chapter and the next ones: the vocabulary (tasks, errors, what every layer
# shares), then the leaves the paper defines (the data, the model, the losses of section III-B, the ABAW scores), what
# composes them (the synthetic twin, evaluation, inference on real video), the trainer, and last the entry points (the
# `mtanet` command and this book's kit). A module imports only from its own layer or the ones above it in the table;
# `tests/test_structure.py` reads every import statement, those inside functions too, and fails on a cycle or on an
# import that points up. The table is read from the sources when the book is built.

# %% tags=["hide-input"]
from mtanet.book.layout import LAYERS, modules_table  # noqa: E402 - this section's only helper

layout = modules_table()
assert list(layout["layer"].unique()) == list(LAYERS), "a module outside the layers of the package"
display(layout.style.hide(axis="index").format({"lines": "{:,}"}))
per_layer = layout.groupby("layer", sort=False)["lines"].sum()
display(Markdown(
    f"{len(layout)} modules, {layout['lines'].sum():,} lines; the trainer itself (`train/trainer.py`) is "
    f"{int(layout.loc[layout['module'] == 'train/trainer.py', 'lines'].iloc[0]):,} lines, and the entry points "
    f"(the command line and the book kit) {per_layer.iloc[-1]:,}."))
