"""Numbers reported by Hu et al., "Squeeze-and-Excitation Networks".

Source: TPAMI 2019 (arXiv:1709.01507 v4); the tables are reproduced in the
documentation (docs/reference/facts.md, The paper). Parameter counts are in
millions, GFLOPs are billions of multiply-adds of the Caffe models, errors
are percentages. Experiments and tests read the paper's numbers from here
and nowhere else.
"""

# Table 2: (top-1 err, top-5 err, GFLOPs) for the re-implemented baseline and
# its SE counterpart. The registry names build the Caffe layouts whose
# multiply-adds the paper reports; each baseline is its SE model's plain twin
# (se_jax.models.plain_twin).
TABLE2 = {
    "ResNet-50": dict(
        baseline=(24.80, 7.48, 3.86), se=(23.29, 6.62, 3.87),
        names=("legacy_resnet50", "legacy_se_resnet50")),
    "ResNet-101": dict(
        baseline=(23.17, 6.52, 7.58), se=(22.38, 6.07, 7.60),
        names=("legacy_resnet101", "legacy_se_resnet101")),
    "ResNet-152": dict(
        baseline=(22.42, 6.34, 11.30), se=(21.57, 5.73, 11.32),
        names=("legacy_resnet152", "legacy_se_resnet152")),
    "ResNeXt-50 32x4d": dict(
        baseline=(22.11, 5.90, 4.24), se=(21.10, 5.49, 4.25),
        names=("legacy_resnext50_32x4d", "legacy_se_resnext50_32x4d")),
    "ResNeXt-101 32x4d": dict(
        baseline=(21.18, 5.57, 7.99), se=(20.70, 5.01, 8.00),
        names=("legacy_resnext101_32x4d", "legacy_se_resnext101_32x4d")),
}

# Ablations on SE-ResNet-50 (Tables 10-16): (top-1, top-5, params M or None,
# GFLOPs or None). FC biases are removed in these runs (Sec. 6).
ABLATION_BASELINE = (23.30, 6.55, 25.6, None)
TABLE10_REDUCTION = {
    2: (22.29, 6.00, 45.7), 4: (22.25, 6.09, 35.7), 8: (22.26, 5.99, 30.7),
    16: (22.28, 6.03, 28.1), 32: (22.72, 6.20, 26.9),
}
TABLE11_SQUEEZE = {"max": (22.57, 6.09), "avg": (22.28, 6.03)}
TABLE12_EXCITATION = {
    "relu": (23.47, 6.98), "tanh": (23.00, 6.38), "sigmoid": (22.28, 6.03),
}
# Stage numbers follow the paper (stage 2 is the first residual stage).
TABLE13_STAGES = {
    (2,): (23.03, 6.48, 25.6), (3,): (23.04, 6.32, 25.7),
    (4,): (22.68, 6.22, 26.4), (2, 3, 4, 5): (22.28, 6.03, 28.1),
}
TABLE14_INTEGRATION = {
    "standard": (22.28, 6.03), "pre": (22.23, 6.00), "post": (22.78, 6.35),
    "identity": (22.20, 6.15),
}
TABLE15_SE_3X3 = (22.48, 6.02, 25.8, 3.86)
TABLE16_NO_SQUEEZE = (22.93, 6.39, 28.1, 4.27)

# Tables 4 and 5: CIFAR test error, baseline -> SE.
TABLE4_CIFAR10 = {
    "ResNet-110": (6.37, 5.21), "ResNet-164": (5.46, 4.39),
    "WRN-16-8": (4.27, 3.88),
}
TABLE5_CIFAR100 = {
    "ResNet-110": (26.88, 23.85), "ResNet-164": (24.33, 21.31),
    "WRN-16-8": (20.43, 19.14),
}

# Exact parameter counts of timm's models (timm/models/resnet.py).
TIMM_PARAMS = {"resnet50": 25_557_032, "seresnet50": 28_088_024}

# Sec. 7.2, Figs. 6-7 (the role of excitation): a trained SE-ResNet-50, four
# ImageNet classes with 50 validation images each, 50 uniformly sampled
# channels, the last SE block of each stage and the blocks of the last stage;
# Fig. 7 shows goldfish and plane. Keys are ImageNet-1k class indices.
ROLE_OF_EXCITATION = dict(
    classes={1: "goldfish", 254: "pug", 404: "airliner", 972: "cliff"},
    fig7_classes=(1, 404),
    blocks=("SE_2_3", "SE_3_4", "SE_4_6", "SE_5_1", "SE_5_2", "SE_5_3"),
    images_per_class=50,
    channels=50,
)

# SE's successors on ResNet-50 / ImageNet, as their own papers (or their
# authors' repositories) report them: (top-1 err, top-5 err, params M,
# GFLOPs), None where the source gives no number. Each entry pairs the
# kind's row with the baseline ResNet-50 row of the same source, since the
# sources trained their baselines differently (and count parameters
# differently: ECA-Net's table has ResNet-50 at 24.37M, the others 25.56M).
# Errors are 100 - the accuracies the sources print.
ATTENTION_RESNET50 = {
    "se": dict(
        source="Hu et al., TPAMI 2019 (arXiv:1709.01507), Table 2",
        baseline=(24.80, 7.48, None, 3.86), attention=(23.29, 6.62, None,
                                                       3.87)),
    "eca": dict(
        source="Wang et al., ECA-Net, CVPR 2020 (arXiv:1910.03151),"
               " Table 2, as on the authors' poster (BangguWu/ECANet)",
        baseline=(24.80, 7.48, 24.37, 3.86),
        attention=(22.52, 6.32, 24.37, 3.86)),
    "cbam": dict(
        source="ECA-Net, CVPR 2020, Table 2 (its CBAM row), as on the"
               " authors' poster (BangguWu/ECANet)",
        baseline=(24.80, 7.48, 24.37, 3.86),
        attention=(22.66, 6.31, 26.77, 3.87)),
    "ge": dict(
        source="Lee et al., SRM, ICCV 2019 (arXiv:1903.10829), ImageNet"
               " table (its GE row), in the authors' repository"
               " (hyunjaelee410/style-based-recalibration-module)",
        baseline=(24.11, 7.15, 25.56, 3.86),
        attention=(23.25, 6.59, 31.12, 3.87)),
    "srm": dict(
        source="Lee et al., SRM, ICCV 2019 (arXiv:1903.10829), ImageNet"
               " table, in the authors' repository",
        baseline=(24.11, 7.15, 25.56, 3.86),
        attention=(22.87, 6.49, 25.62, 3.88)),
    "gct": dict(
        source="Yang et al., GCT, CVPR 2020 (arXiv:1909.11519), as its"
               " authors' README (z-x-yang/GCT) reports it",
        baseline=(23.8, 7.0, None, None),
        attention=(22.7, 6.3, None, None)),
    "simam": dict(
        source="Yang et al., SimAM, ICML 2021, as its authors' README"
               " (ZjjConan/SimAM) reports it; its GFLOPs count ResNet-50"
               " v1.5 (stride on the 3x3 conv)",
        baseline=None, attention=(22.55, 6.34, 25.56, 4.11)),
    "ese": dict(
        source="Lee & Park, CenterMask, CVPR 2020: no ResNet-50 ImageNet"
               " result (eSE is used in VoVNetV2)",
        baseline=None, attention=None),
    "coord": dict(
        source="Hou et al., Coordinate Attention, CVPR 2021: no ResNet-50"
               " ImageNet result (MobileNet only)",
        baseline=None, attention=None),
}
