"""Training of PiD networks (stage 0 PixelDiT finetune, stage 1 teacher). ``model/`` never imports this package."""
