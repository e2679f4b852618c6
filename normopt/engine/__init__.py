"""TensorRT engines: building them (with normopt's norm plugins registered) and timing them;
OpenVINO's CPU plugin as a second engine to time and check on (engine.openvino).

TensorRT is an optional extra, imported lazily inside the commands that need it: without it
each of them fails with one line naming what to install (`trt.load_tensorrt`)."""
