"""Built-in model sources: timm (the default, no prefix needed), torchvision (`tv:`) and Hugging Face
transformers classes built from configs (`hf:`)."""
from surgeon.hookspecs import hookimpl


def _timm_create(name, *, pretrained=False, **kwargs):
    import timm

    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _timm_names():
    import timm

    return timm.list_models()


def _tv_create(name, *, pretrained=False, **kwargs):
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if not pretrained and "weights_backbone" in inspect.signature(builder).parameters:
        # a fresh detector or segmenter: without this its builder downloads ImageNet weights for the backbone
        kwargs.setdefault("weights_backbone", None)
    return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)


def _tv_names():
    import torchvision

    return torchvision.models.list_models()


@hookimpl
def register_model_sources(register):
    register("timm", _timm_create, names=_timm_names, summary="timm models (the default: 'resnet50')")
    register("tv", _tv_create, names=_tv_names, aliases=("torchvision",), summary="torchvision models")
    register("hf", _hf_create, names=_hf_names, aliases=("transformers",),
             summary="Hugging Face transformers classes, built from a config ('hf:BertForSequenceClassification')")


def _hf_create(name, *, pretrained=False, **kwargs):
    from surgeon import hf

    return hf.create(name, pretrained=pretrained, **kwargs)


def _hf_names():
    from surgeon import hf

    return hf.names()
