"""The embedded demo model's world: generated scenes with ground truth (scenes.py), the tokenizer trained
for them (bpe.py), and the recipe that trains weights/dyrate-shapes (train.py)."""
