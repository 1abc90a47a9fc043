"""The toy CLIP: a small open_clip model the project pretrains itself, on toy-world captions.

The platform cannot download real CLIP weights, so the toy world gets an honest stand-in. Real CLIP
was pretrained on web image-text pairs before anyone chose a seen/unseen split; likewise this model
is trained contrastively on toy-world images whose captions name *all* ten toy classes, seen and
unseen alike. Split Matching then uses it exactly as it uses ViT-B/16: frozen, built by open_clip's
factory from `model_configs/splitmatch-toy-vit.json`, weights loaded with `pretrained=PATH`
(`build_clip`). No segmentation label is used here beyond "which classes are visible", which is
what a caption says.

Training data are drawn on the fly, a pure function of (seed, step, slot in the batch):
- single-object images with single-class prompts (the ZegCLIP templates among them), so that
  zero-shot classification with "a photo of a {}." works; some show the object at twice its
  usual size, so fine textures are seen up close;
- scenes of 2-4 objects whose captions list the visible classes ("there is a brick, a grape and
  a zebra in the scene."), so that patch features, not only the CLS token, carry the classes;
  some scenes are zoomed-in crops of a twice-as-large render, so objects are also seen at the
  scale they have when dense features are computed at twice the CLIP input size;
- object-free pictures captioned as background ("an empty scene."), some with regions blacked
  out, and some single objects shown on black: the inputs of the masked-CLS pass look like these,
  and real CLIP, unlike a model that has only ever seen the ten classes, knows that a plain wall
  is none of them.
Two images of one batch often share a class (ten classes, 64 images): plain InfoNCE would push
them apart as negatives. The targets are therefore soft: image i's target over captions is
proportional to the Jaccard overlap of their class sets (identical sets count as full positives).

The checkpoint is cached at `{cache_dir}/{key}/` (a local folder, or a prefix on object storage
that each node mirrors, see `splitmatch.storage`) (`toy_clip.pt`: an open_clip state dict,
`toy_clip.json`: what it was trained from and how well it classifies), the key a hash of what the
weights are: a format version, the config section, the recipe. The folder is assembled under a
temporary name and renamed into place, so an interrupted pretraining never leaves a folder that
looks complete.

Modules: `captions` (the training data and its recipe), `training` (loss, model, loop),
`quality` (zero-shot accuracy, pseudo-mask quality), `checkpoint` (the cache and
`with_toy_clip`), `compact` (the shipped form: only the token rows toy captions read), `ship`
(writes it), `command` (`splitmatch toy-clip`).
"""
from splitmatch.toyclip.captions import (BACKGROUND_TEMPLATES, CLASS_NAMES, DEFAULT_RECIPE,
                                         SCENE_TEMPLATES, SINGLE_TEMPLATES, TEST_TEMPLATE,
                                         CaptionedImage, ToyClipRecipe, make_caption,
                                         training_batch, training_sample, visible_classes)
from splitmatch.toyclip.checkpoint import (CHECKPOINT_NAME, INFO_NAME, TOY_CLIP_FORMAT,
                                           checkpoint_dir, checkpoint_info, checkpoint_inputs,
                                           checkpoint_key, checkpoint_location, pretrain_toy_clip,
                                           toy_clip_checkpoint, with_toy_clip)
from splitmatch.toyclip.command import main_toy_clip
from splitmatch.toyclip.quality import (pseudo_mask_quality, zero_shot_accuracy, zero_shot_images,
                                        zero_shot_report)
from splitmatch.toyclip.training import (contrastive_loss, create_model, jaccard_targets,
                                         train_toy_clip)

__all__ = [
    "BACKGROUND_TEMPLATES", "CHECKPOINT_NAME", "CLASS_NAMES", "DEFAULT_RECIPE", "INFO_NAME",
    "SCENE_TEMPLATES", "SINGLE_TEMPLATES", "TEST_TEMPLATE", "TOY_CLIP_FORMAT", "CaptionedImage",
    "ToyClipRecipe",
    "checkpoint_dir", "checkpoint_info", "checkpoint_inputs", "checkpoint_key",
    "checkpoint_location", "contrastive_loss", "create_model", "jaccard_targets", "main_toy_clip",
    "make_caption", "pretrain_toy_clip", "pseudo_mask_quality", "toy_clip_checkpoint",
    "train_toy_clip", "training_batch", "training_sample",
    "visible_classes", "with_toy_clip", "zero_shot_accuracy", "zero_shot_images",
    "zero_shot_report",
]
