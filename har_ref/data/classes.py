"""The study's 15 HAR action classes, as the HAR dataset names its folders (report sec. 2).

The synthetic demo draws one scene per class; `predict` and the CLI fall back to these names when a
checkpoint carries no classes.json of its own. Any other label set works: classes come from the
dataset's folder names.
"""
CLASS_NAMES = (
    "calling", "clapping", "cycling", "dancing", "drinking", "eating", "fighting", "hugging",
    "laughing", "listening_to_music", "running", "sitting", "sleeping", "texting", "using_laptop",
)
