"""A Keras 3 script in the shape of Horovod's tensorflow2_keras_mnist example (model.fit with
DistributedOptimizer and Horovod's callbacks): only the import line differs from a Horovod
script. It trains on scikit-learn's 8x8 digits (pyddl.train.data), so it runs offline.

    pyddl run -np 2 examples/keras_mnist_style.py
    pyddl run -np 4 examples/keras_mnist_style.py --epochs 8

Rank 0 prints Keras's progress (the metrics averaged over the workers) and the test accuracy.
"""

import argparse

import tensorflow as tf

import pyddl.keras as hvd  # was: import horovod.tensorflow.keras as hvd
from pyddl.train.data import digits_split

parser = argparse.ArgumentParser(description="Horovod's Keras model.fit example on pyddl")
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--steps-per-epoch", type=int, default=64, help="steps of the whole job per epoch")
parser.add_argument("--batch-size", type=int, default=32, help="per-worker batch")
parser.add_argument("--lr", type=float, default=0.002, help="learning rate of one worker")
parser.add_argument("--warmup-epochs", type=int, default=2)
args = parser.parse_args()

hvd.init()
gpus = tf.config.experimental.list_physical_devices("GPU")
for gpu in gpus:
    tf.config.experimental.set_memory_growth(gpu, True)
if gpus:
    tf.config.experimental.set_visible_devices(gpus[hvd.local_rank()], "GPU")

split = digits_split()
images, labels = (t.numpy() for t in split.train.tensors)
dataset = tf.data.Dataset.from_tensor_slices((images.transpose(0, 2, 3, 1), labels))
dataset = dataset.repeat().shuffle(2000, seed=hvd.rank()).batch(args.batch_size)

model = tf.keras.Sequential([
    tf.keras.Input((8, 8, 1)),
    tf.keras.layers.Conv2D(16, [3, 3], activation="relu"),
    tf.keras.layers.Conv2D(32, [3, 3], activation="relu"),
    tf.keras.layers.MaxPooling2D(pool_size=(2, 2)),
    tf.keras.layers.Dropout(0.25),
    tf.keras.layers.Flatten(),
    tf.keras.layers.Dense(64, activation="relu"),
    tf.keras.layers.Dropout(0.5),
    tf.keras.layers.Dense(10, activation="softmax"),
])

# Horovod: scale the learning rate by the number of workers, and wrap the optimizer.
scaled_lr = args.lr * hvd.size()
opt = hvd.DistributedOptimizer(tf.optimizers.Adam(scaled_lr))
model.compile(loss=tf.losses.SparseCategoricalCrossentropy(), optimizer=opt, metrics=["accuracy"])

callbacks = [
    # Horovod: rank 0's initial state to every worker, after the first batch.
    hvd.callbacks.BroadcastGlobalVariablesCallback(0),
    # Horovod: the metrics at each epoch's end averaged over the workers.
    hvd.callbacks.MetricAverageCallback(),
    # Horovod: from lr to lr * size over the first epochs (Goyal et al.).
    hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=args.warmup_epochs, verbose=1),
]
verbose = 2 if hvd.rank() == 0 else 0
model.fit(dataset, steps_per_epoch=args.steps_per_epoch // hvd.size(), callbacks=callbacks, epochs=args.epochs,
          verbose=verbose)

test_images, test_labels = (t.numpy() for t in split.test.tensors)
_, accuracy = model.evaluate(test_images.transpose(0, 2, 3, 1), test_labels, verbose=0)
accuracy = hvd.allreduce(accuracy, name="test_accuracy")
if hvd.rank() == 0:
    print(f"test accuracy: {float(accuracy):.4f}")
hvd.shutdown()
