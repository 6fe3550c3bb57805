"""The model families, one adapter per kind of model, answering everything a script or command asks about it: how
it is detected from its pipeline folder, which of a script's flags apply to it, its memory-bank plan (the record a
bank carries and the sampler that makes one), its views of the data and of a bank, how it is fed, conditioned and
predicts, its inference pipeline and card tags: class-conditional DiT, the pixel-space DDPM UNet, Stable Diffusion
1.x/2.x, SDXL, SD3 and ControlNets on SD/SDXL; with the parameter-efficient modes, image classifiers, and the lists
of families each command takes (`registry`)."""
