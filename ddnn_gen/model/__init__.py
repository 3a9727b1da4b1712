"""The model: spec, zoo, Chainer links and network, model files, data sets, joint training, evaluation."""
