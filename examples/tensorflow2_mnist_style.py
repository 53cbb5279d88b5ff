"""A TensorFlow 2 script in the shape of Horovod's tensorflow2_mnist example (a tf.function
step, DistributedGradientTape, the variables broadcast after the first batch): only the
import line differs from a Horovod script. It trains on scikit-learn's 8x8 digits
(pyddl.train.data), so it runs offline.

    pyddl run -np 2 examples/tensorflow2_mnist_style.py
    pyddl run -np 4 --allreduce multiring examples/tensorflow2_mnist_style.py --steps 400

Rank 0 prints the loss every 20 steps and, at the end, the test accuracy.
"""

import argparse

import tensorflow as tf

import pyddl.tensorflow as hvd  # was: import horovod.tensorflow as hvd
from pyddl.train.data import digits_split

parser = argparse.ArgumentParser(description="Horovod's TF2 GradientTape example on pyddl")
parser.add_argument("--steps", type=int, default=200, help="steps of the whole job (divided among the workers)")
parser.add_argument("--batch-size", type=int, default=32, help="per-worker batch")
parser.add_argument("--lr", type=float, default=0.002, help="learning rate of one worker")
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
loss = tf.losses.SparseCategoricalCrossentropy()
# Horovod: scale the learning rate by the number of workers.
opt = tf.optimizers.Adam(args.lr * hvd.size())


@tf.function
def training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        probs = model(images, training=True)
        loss_value = loss(labels, probs)
    # Horovod: wrap the tape so the gradients are averaged over the workers.
    tape = hvd.DistributedGradientTape(tape)
    grads = tape.gradient(loss_value, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    # Horovod: broadcast the initial state from rank 0 after the first step, once the
    # optimizer's variables exist (Keras 3: opt.variables is a list, not a method).
    if first_batch:
        hvd.broadcast_variables(model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)
    return loss_value


for batch, (images, labels) in enumerate(dataset.take(args.steps // hvd.size())):
    loss_value = training_step(images, labels, batch == 0)
    if batch % 20 == 0 and hvd.rank() == 0:
        print(f"Step #{batch}\tLoss: {float(loss_value):.6f}")

test_images, test_labels = (t.numpy() for t in split.test.tensors)
probs = model(test_images.transpose(0, 2, 3, 1), training=False)
accuracy = hvd.allreduce(tf.reduce_mean(tf.cast(tf.argmax(probs, 1) == test_labels, tf.float32)))
if hvd.rank() == 0:
    print(f"Final loss: {float(loss_value):.6f}  test accuracy: {float(accuracy):.4f}")
hvd.shutdown()
