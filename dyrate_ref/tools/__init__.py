"""What measures and tunes the method around the core: evaluation (evaluate.py), speed and memory
benchmarks (bench.py), VTW's layer calibration (calibrate_vtw.py) and DyRate's predictor training
(train_predictor.py). Each is a command; none imports another (data.py is their shared example reader)."""
