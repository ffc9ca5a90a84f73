"""Constants from Krizhevsky, Sutskever & Hinton (NIPS 2012), in one place.

Every number the rest of the package takes from the paper (or from the reference
implementations it cites) lives here, with its section. Sources and the reasoning
behind each reading are in the comment beside it (section numbers refer to the paper).
"""

# Sec. 3.3: local response normalisation, b_i = a_i / (k + alpha * sum_j a_j^2)^beta,
# the sum running over the n channels centred on i. alpha multiplies the plain sum.
LRN_SIZE = 5  # n
LRN_BIAS = 2.0  # k
LRN_ALPHA = 1e-4  # alpha
LRN_BETA = 0.75  # beta

# Sec. 3.4: overlapping pooling, z = 3, s = 2.
POOL_SIZE = 3
POOL_STRIDE = 2

# Sec. 3.5 / Fig. 2: layer widths (split evenly between the two towers).
CONV_FILTERS = (96, 256, 384, 384, 256)
FC_UNITS = (4096, 4096)
NUM_CLASSES = 1000

# Sec. 4.2: dropout on the outputs of fc6 and fc7.
DROPOUT_RATE = 0.5

# Sec. 2 / 4.1: images are rescaled to 256x256 and the net sees random crops. The paper
# writes 224, but 224 with an 11x11/4 VALID conv1 gives 54x54 maps, not the 55x55 of
# Fig. 2; 227 gives 55 -> 27 -> 13 -> 6 (Caffe's crop_size: 227).
RESIZE_SIZE = 256
IMAGE_SIZE = 227
MIN_IMAGE_SIZE = 67  # smallest input that leaves a non-empty (1x1) pool5

# Sec. 2: the mean activity over the training set is subtracted from each pixel (raw
# 0-255 RGB, no division by a standard deviation). Per-channel ImageNet means, RGB order.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)

# Sec. 4.1: PCA colour augmentation. Eigen-decomposition of the ImageNet RGB pixel
# covariance for pixels in [0, 1] (fb.resnet.torch); column j of the eigenvector matrix
# pairs with eigenvalue j. On 0-255 pixels the offset is scaled by 255.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
PCA_ALPHA_STD = 0.1

# Sec. 5: initialisation. Weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and
# the hidden fully connected layers, 0 elsewhere.
INIT_STDDEV = 0.01
ONE_BIAS_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")

# Sec. 5: optimiser. Batch 128, momentum 0.9, weight decay 0.0005 inside the momentum
# buffer (v <- 0.9 v - 0.0005 lr w - lr grad), learning rate 0.01 divided by 10 when the
# validation error stops improving, three times, for about 90 epochs.
BATCH_SIZE = 128
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0005
LEARNING_RATE = 0.01
LR_DROP_FACTOR = 0.1
LR_DROPS = 3
EPOCHS = 90

# Fig. 2 / Sec. 3.1 with 227x227 inputs, two towers, 1000 classes (= Caffe bvlc_alexnet).
PARAMETER_COUNT = 60_965_224

# ---------------------------------------------------------------------------------------
# The two published weight sets this package converts (keras_alexnet.convert).

# Caffe's bvlc_alexnet (BVLC model zoo, models/bvlc_alexnet/deploy.prototxt): the paper's
# two-group network at 227x227, trained on BGR 0-255 pixels minus the ImageNet mean image
# (ilsvrc_2012_mean.binaryproto), whose per-channel average is CAFFE_MEAN_BGR. Its LRN
# layers are local_size 5, alpha 1e-4, beta 0.75 and Caffe's default k = 1, with Caffe's
# convention scale = k + alpha / n * sum: here alpha / n (see layers.LocalResponseNormalization).
# Top-1/top-5 accuracy 57.1 % / 80.2 % (centre crop, ILSVRC2012 val; BVLC model zoo readme).
CAFFE_LRN_BIAS = 1.0
CAFFE_LRN_ALPHA = 1e-4 / LRN_SIZE
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

# torchvision.models.alexnet (AlexNet_Weights.IMAGENET1K_V1), after "One weird trick"
# (Krizhevsky 2014): one tower of 64-192-384-256-256 filters, conv1 11x11/4 padded by 2,
# no LRN, an adaptive 6x6 average pool after pool5; 224x224 inputs resized to 256 on the
# shorter side, scaled to [0, 1] and normalised with the ImageNet mean and std below.
# 61,100,840 parameters; top-1/top-5 accuracy 56.522 % / 79.066 % (torchvision docs).
TORCHVISION_CONV_FILTERS = (64, 192, 384, 256, 256)
TORCHVISION_IMAGE_SIZE = 224
TORCHVISION_RESIZE_SIZE = 256
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
TORCHVISION_PARAMETER_COUNT = 61_100_840
