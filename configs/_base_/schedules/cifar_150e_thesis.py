# The second-order schedule of Yi Ren's thesis for CIFAR (Sec. 3.5.2, 4.7):
# batch 128, 150 epochs, learning rate x0.1 at epochs 50 and 100.
train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = dict(batch_size=128)
max_epochs = 150
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict()
test_cfg = dict()
param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[50, 100], gamma=0.1)
auto_scale_lr = dict(base_batch_size=128)
