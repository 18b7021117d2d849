"""Command line: odtk {train,infer,export,benchmark,convert,synthetic,info,data}."""
import argparse
import sys
import time
from typing import List, Optional

from .backbones import BACKBONES
from .constants import DEFAULT_OPSET, LOADED
from .distributed import DEVICES, MASTER, Context, TrainingStopped, WorkersFailed, torchrun_context, worker_setup
from .utils import OdtkError, log

BACKBONE_HELP = ", ".join(BACKBONES)


def _master(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"'{value}' is not address:port")
    return value


def _anchor_value(value: str):
    """A number, or `auto` (checked to stand alone by checks.anchor_setting)."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number or auto") from None


def _anchor_setting(values: Optional[list]):
    """`--anchor-scales auto` -> "auto"; numbers (or a mix, which the config refuses) as given."""
    return "auto" if values == ["auto"] else values


def _anchor_flags(parser: argparse.ArgumentParser, scales_help: str, ratios_help: str) -> None:
    parser.add_argument("--anchor-ious", type=float, nargs=2, default=[0.4, 0.5], metavar=("BG", "FG"),
                        help="IoU below BG is background, at or above FG foreground")
    parser.add_argument("--anchor-scales", type=_anchor_value, nargs="+", metavar="S", help=scales_help)
    parser.add_argument("--anchor-ratios", type=_anchor_value, nargs="+", metavar="R", help=ratios_help)


def parse(args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="odtk", description="RetinaNet object detection toolkit",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--master", metavar="address:port", type=_master, default=MASTER,
                        help="address and port of the rank 0 process for distributed training")
    parser.add_argument("--verbose", action="store_true", help="more detail")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("train", help="train a model", formatter_class=fmt)
    p.add_argument("model", help="output model checkpoint (.pth); resumed when it exists unless --override")
    p.add_argument("--annotations", required=True, help="COCO annotations JSON")
    p.add_argument("--images", default=".", help="folder of the training images")
    p.add_argument("--backbone", nargs="+", default=None, metavar="NAME",
                   help=f"{BACKBONE_HELP} (default: ResNet50FPN; resuming keeps the checkpoint's)")
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes (default: the categories of --annotations; ODTK's 80 for COCO)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size over all workers, split evenly among them (default: 2 per worker)")
    p.add_argument("--resize", type=int, default=800, help="shorter side for validation")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the longer side")
    p.add_argument("--jitter", type=int, nargs=2, default=[640, 1024], metavar=("MIN", "MAX"),
                   help="random shorter side while training")
    p.add_argument("--iters", type=int, default=90000, help="iterations")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="fine-tune within MINUTES on this machine: resolution from the object sizes, iterations from "
                        "the measured speed, warm-up and decay to match, gradient clipping on (flags you set are kept)")
    p.add_argument("--milestones", type=int, nargs="*", default=[60000, 80000], help="lr decay iterations")
    p.add_argument("--schedule", type=float, default=1.0, help="scales --iters and --milestones")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument("--warmup", type=int, default=1000, help="linear warmup iterations")
    p.add_argument("--gamma", type=float, default=0.1, help="lr decay factor at each milestone")
    p.add_argument("--regularization-l2", type=float, default=1e-4, help="weight decay")
    p.add_argument("--full-precision", action="store_true",
                   help="no mixed precision (fp16 on GPU, bf16 on a CPU with AVX512-BF16/AMX)")
    p.add_argument("--override", action="store_true", help="restart training even if MODEL exists")
    p.add_argument("--fine-tune", metavar="PATH", help="start from this checkpoint's weights")
    p.add_argument("--val-annotations", help="COCO annotations for validation")
    p.add_argument("--val-images", help="folder of the validation images (default: --images)")
    p.add_argument("--val-iters", type=int, default=8000, help="validate and checkpoint every N iterations")
    p.add_argument("--logdir", help="TensorBoard log folder")
    p.add_argument("--post-metrics", metavar="URL", help="POST metrics as JSON to this URL")
    p.add_argument("--with-dali", action="store_true", help="load data with NVIDIA DALI")
    p.add_argument("--rotated-bbox", action="store_true",
                   help="rotated boxes (ODTK's): annotations' bbox [x, y, w, h, theta] (theta in radians, within "
                        "+-pi/4), anchors also turned by -30, 0 and 30 degrees, a 6th box output for the angle, "
                        "matching and NMS on the rotated IoU, validation AP on it")
    p.add_argument("--augment-rotate", action="store_true", help="random quarter-turn rotations")
    p.add_argument("--augment-crop", action="store_true",
                   help="random crop keeping boxes (SSD-style min-IoU), before the resize")
    p.add_argument("--augment-brightness", type=float, default=0.002, help="brightness jitter")
    p.add_argument("--augment-contrast", type=float, default=0.002, help="contrast jitter")
    p.add_argument("--augment-saturation", type=float, default=0.002, help="saturation jitter")
    p.add_argument("--augment-hue", type=float, default=0.0002, help="hue jitter")
    _anchor_flags(p, "anchor sides as multiples of the stride, or auto: fitted to the boxes after --resize "
                     "(default: ODTK's 4 5.04 6.35, fitted instead when they fit the boxes poorly; resuming keeps "
                     "the checkpoint's)",
                  "anchor height/width ratios, or auto: fitted to the boxes (default: ODTK's 1 2 0.5)")
    p.add_argument("--head-channels", type=int, default=None, metavar="N",
                   help="width of the FPN and the heads (default 256, ODTK's; --time-budget picks 128 when 256 "
                        "leaves too few steps): with a MobileNetV2 body 128 has 0.29x the FLOPs, a CPU step 0.45x")
    p.add_argument("--backbone-weights", metavar="PATH",
                   help="torchvision ImageNet weights (file, or folder with torchvision's file name); default: "
                        "torch's hub cache, else random weights")
    p.add_argument("--clip-grad", type=float, default=0.0, metavar="NORM", help="clip gradient norm (0: off)")
    p.add_argument("--loader-workers", type=int, default=2, help="data loader processes")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.9999) for validation and export "
                        "(0: off)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="training processes on this machine (DDP): default one per GPU; on CPU 1 (N > 1: gloo)")
    p.add_argument("--nodes", type=int, default=1, help="machines taking part (multi-node: same command on each)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index among --nodes (0 hosts --master)")
    _device_flag(p, "train on: auto = the GPUs when PyTorch sees one (a worker per GPU, NCCL), else the CPU; cpu "
                    "also on a GPU machine (gloo workers)")

    p = sub.add_parser("infer", help="run inference (and COCO evaluation)", formatter_class=fmt)
    p.add_argument("model", help="model: .pth (PyTorch), .onnx (ONNX Runtime) or .plan (TensorRT)")
    p.add_argument("--images", default=".",
                   help="a folder of images, one image, a quoted glob ('shots/*.jpg'), a .txt list of paths (one "
                        "per line, relative to the list), or a video (.mp4 .avi .mov .mkv .webm; needs PyAV)")
    p.add_argument("--annotations", help="COCO annotations: infer on their images (in the --images folder) and "
                                         "evaluate")
    p.add_argument("--output", default=None,
                   help="COCO detections JSON to write (default detections.json); for a video, JSON lines, one per "
                        "frame (default <video stem>.detections.jsonl)")
    p.add_argument("--save-images", metavar="DIR",
                   help="also write each image with its detections drawn, as JPEG, to DIR under its own name (.jpg "
                        "added to other types); for a video, the annotated video DIR/<video stem>.mp4")
    p.add_argument("--draw-threshold", type=float, default=0.3, help="the lowest score --save-images draws")
    p.add_argument("--draw-ground-truth", action="store_true",
                   help="--save-images also draws the --annotations boxes (thin white, name below)")
    p.add_argument("--batch", type=int, default=2, help="batch size")
    p.add_argument("--resize", type=int, default=800, help="shorter side")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the longer side")
    p.add_argument("--with-dali", action="store_true", help="load data with NVIDIA DALI")
    p.add_argument("--full-precision", action="store_true", help="no fp16 on GPU")
    p.add_argument("--loader-workers", type=int, default=2, help="data loader processes")
    _device_flag(p, "run a .pth model on: auto = CUDA when PyTorch sees a GPU, else the CPU (.onnx runs in ONNX "
                    "Runtime, .plan on the GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (.pth): slower start, faster batches; pays on long runs")
    p.add_argument("--rotated-bbox", action="store_true",
                   help="expect a rotated model (trained with --rotated-bbox; a model file says so itself, so this "
                        "only checks): detections as bbox [x, y, w, h, theta] and corners, AP on the rotated IoU")
    p.add_argument("--plots", metavar="FOLDER",
                   help="with --annotations: write pr_curve.png, confusion_matrix.png, per_class_ap.png and "
                        "per_class.csv there (needs odtk[plots])")

    p = sub.add_parser("export", help="export to ONNX or a TensorRT engine", formatter_class=fmt)
    p.add_argument("model", help="model checkpoint (.pth)")
    p.add_argument("export", help="output: .onnx or .plan")
    p.add_argument("--size", type=int, nargs="+", default=[1280, 1280], help="input size: square or height width")
    p.add_argument("--batch", type=int, default=2, help="max batch size")
    p.add_argument("--full-precision", action="store_true",
                   help="TensorRT: FP32 engine instead of FP16 (ONNX is always exported in FP32)")
    p.add_argument("--int8", action="store_true",
                   help="INT8: static post-training quantization to a Q/DQ ONNX calibrated on --calibration-images")
    p.add_argument("--calibration-batches", type=int, default=2, help="calibration batches")
    p.add_argument("--calibration-images", default=None, metavar="FOLDER",
                   help="folder of calibration images (required with --int8 unless --calibration-table exists)")
    p.add_argument("--calibration-table", default="", help="calibration table to save/reuse")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--rotated-bbox", action="store_true",
                   help="expect a rotated model (the checkpoint says so itself, so this only checks): its ONNX holds "
                        "the raw heads (ONNX has no rotated NMS: ONNX Runtime inference decodes and suppresses after "
                        "the graph), its .plan the rotated decode/NMS plugins")
    p.add_argument("--raw-heads", action="store_true",
                   help="export only the network (input_1 -> score_1..N, box_1..N: ODTK's TensorRT contract) instead "
                        "of the end-to-end graph with decode and NMS (scores, boxes, classes) that ONNX Runtime runs")
    p.add_argument("--dynamic-batch-opts", type=int, nargs=3, default=None, metavar=("MIN", "OPT", "MAX"),
                   help="TensorRT dynamic batch profile")
    p.add_argument("--dynamic-size", action="store_true",
                   help="any input height and width (multiples of the stride; ONNX: --size is only the trace size; "
                        ".plan: within --dynamic-size-opts): inference resizes each image by --resize/--max-size as "
                        "a .pth does, instead of fitting it into --size")
    p.add_argument("--dynamic-size-opts", nargs=3, default=None, metavar=("MIN", "OPT", "MAX"),
                   help="--dynamic-size .plan: TensorRT's input size profile, each a side (square) or HEIGHTxWIDTH, "
                        "multiples of the stride (default: one stride to the --max-size square, tuned for "
                        "--resize x --max-size)")
    p.add_argument("--resize", type=int, default=None,
                   help="--dynamic-size: shorter side that inference resizes to (default: the checkpoint's training "
                        "--resize)")
    p.add_argument("--max-size", type=int, default=None,
                   help="--dynamic-size: cap on the longer side (default: the checkpoint's training --max-size)")
    _device_flag(p, "a .plan is built on the GPU (cpu: refused); ONNX is traced and calibrated on the CPU either way")

    p = sub.add_parser("benchmark", help="which form to deploy: AP, speed and size of PyTorch, ONNX Runtime fp32/INT8 "
                                         "and TensorRT FP16/INT8", formatter_class=fmt)
    p.add_argument("model", help="model checkpoint (.pth): every form is exported from it")
    p.add_argument("--images", required=True, help="folder of the images of --annotations (also INT8 calibration)")
    p.add_argument("--annotations", required=True, help="COCO annotations: every form's AP on their images")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="SIDE",
                   help="ONNX/TensorRT input, square or height width (default: the size most images need at the "
                        "checkpoint's training resize/max-size, fitted to the stride)")
    p.add_argument("--batch", type=int, default=8, help="batch for the images/s column (and the exports)")
    p.add_argument("--calibration-batches", type=int, default=2, help="INT8 calibration batches of --batch images")
    p.add_argument("--images-limit", type=int, default=32, metavar="N", help="images timed (the first N)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="keep the exports and each form's detections here (default: a temp folder, removed)")
    p.add_argument("--loader-workers", type=int, default=2, help="data loader processes for the AP pass")

    p = sub.add_parser("convert", help="Pascal VOC XML, YOLO or DOTA labels -> COCO JSON", formatter_class=fmt)
    p.add_argument("source", help="VOC root (with Annotations/) or folder of XML, YOLO labels folder, or DOTA "
                                  "labelTxt folder")
    p.add_argument("output", help="COCO JSON to write (DOTA: rotated, bbox [x, y, w, h, theta] and corners)")
    p.add_argument("--format", choices=["voc", "yolo", "dota"], default="voc", help="input format")
    p.add_argument("--images", help="images folder (YOLO, DOTA: required; VOC: default JPEGImages beside)")
    p.add_argument("--split", help="VOC ImageSets/Main/<split>.txt to restrict to (e.g. trainval, test)")
    p.add_argument("--image-set", help="file listing the image ids to keep")
    p.add_argument("--class-names", nargs="+", metavar="NAME",
                   help="class names in id order (YOLO: names of indices 0..N-1; VOC, DOTA: keep only these)")

    p = sub.add_parser("synthetic", help="write a small synthetic COCO dataset (shapes on noise)",
                       formatter_class=fmt)
    p.add_argument("output", help="folder to write images/ and train.json, val.json into")
    p.add_argument("--train", type=int, default=200, help="training images")
    p.add_argument("--val", type=int, default=50, help="validation images")
    p.add_argument("--size", type=int, default=256, help="image side")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--rotated", action="store_true",
                   help="elongated rectangles and ellipses turned up to 45 degrees either way: rotated COCO (bbox "
                        "[x, y, w, h, theta] and corners), and their enclosing boxes in train_aabb.json, val_aabb.json")
    p = sub.add_parser("info", help="describe a model file: classes, anchors, parameters, GFLOPs, training",
                       formatter_class=fmt)
    p.add_argument("model", help="model: .pth checkpoint, .onnx or .plan")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="SIDE",
                   help="input height width (one value: square) for a checkpoint's GFLOPs (default: its training "
                        "--resize/--max-size, else 800 1333; padded like the loaders pad)")
    p = sub.add_parser("data", help="describe a COCO training set: counts, box sizes after the resize, how well the "
                                    "anchors fit them", formatter_class=fmt)
    p.add_argument("annotations", help="COCO annotations JSON")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder of the images, read (headers only) for images without width/height in the JSON")
    p.add_argument("--resize", type=int, default=800, help="shorter side, as training's --resize")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the longer side, as training's --max-size")
    p.add_argument("--rotated-bbox", action="store_true",
                   help="rotated boxes (bbox [x, y, w, h, theta]), as training's --rotated-bbox: the fit uses each "
                        "box's own sides (its anchors turn too)")
    _anchor_flags(p, "anchor sides as multiples of the stride, or auto: fit them (default: ODTK's 4 5.04 6.35)",
                  "anchor height/width ratios, or auto: fit them (default: ODTK's 1 2 0.5)")
    for sub_parser in sub.choices.values():   # --verbose also after the command (ODTK's `export ... --verbose`)
        sub_parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="more detail")
    parsed = parser.parse_args(args)
    if parsed.command == "train":   # which recipe flags were given: --time-budget keeps them even at their defaults
        from .recipe import FIELDS
        unset = object()
        sub.choices["train"].set_defaults(**{name: unset for name in FIELDS})
        again = vars(parser.parse_args(args))
        parsed.given = tuple(name for name in FIELDS if again[name] is not unset)
    return parsed


def _device_flag(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto", help=text)


def run(args: argparse.Namespace) -> None:
    if args.command == "train":
        from .data import Augment
        from .train import TrainConfig, train
        cfg = TrainConfig(
            model=args.model, annotations=args.annotations, images=args.images, backbone=args.backbone,
            classes=args.classes, batch=args.batch, resize=args.resize, max_size=args.max_size,
            jitter=tuple(args.jitter), iters=args.iters, milestones=tuple(args.milestones), schedule=args.schedule,
            lr=args.lr, warmup=args.warmup, gamma=args.gamma, regularization_l2=args.regularization_l2,
            full_precision=args.full_precision, override=args.override, fine_tune=args.fine_tune,
            val_annotations=args.val_annotations, val_images=args.val_images, val_iters=args.val_iters,
            logdir=args.logdir, post_metrics=args.post_metrics,
            augment=Augment(flip=True, rotate=args.augment_rotate, brightness=args.augment_brightness,
                            contrast=args.augment_contrast, saturation=args.augment_saturation,
                            hue=args.augment_hue, crop=args.augment_crop),
            anchor_ious=tuple(args.anchor_ious), anchor_scales=_anchor_setting(args.anchor_scales),
            anchor_ratios=_anchor_setting(args.anchor_ratios),
            backbone_weights=args.backbone_weights, head_channels=args.head_channels,
            clip_grad=args.clip_grad, loader_workers=args.loader_workers,
            seed=args.seed, ema=args.ema, workers=args.workers, nodes=args.nodes, node_rank=args.node_rank,
            master=args.master, with_dali=args.with_dali, device=args.device, time_budget=args.time_budget,
            verbose=args.verbose, rotated_bbox=args.rotated_bbox, given=args.given)
        train(cfg, started=args.started)
    elif args.command == "infer":
        from .infer import InferConfig, infer
        results = infer(InferConfig(model=args.model, images=args.images, annotations=args.annotations,
                                    output=args.output, batch=args.batch, resize=args.resize, max_size=args.max_size,
                                    full_precision=args.full_precision, loader_workers=args.loader_workers,
                                    with_dali=args.with_dali, device=args.device, compile=args.compile,
                                    plots=args.plots, save_images=args.save_images,
                                    draw_threshold=args.draw_threshold, draw_ground_truth=args.draw_ground_truth,
                                    verbose=args.verbose, rotated_bbox=args.rotated_bbox))
        if results and results.get("table"):   # the library returns the evaluation report; showing it is the CLI's job
            print(results["table"])
    elif args.command == "export":
        from .export import ExportConfig, export
        export(ExportConfig(model=args.model, output=args.export, size=tuple(args.size), batch=args.batch,
                            raw_heads=args.raw_heads, opset=args.opset, full_precision=args.full_precision,
                            int8=args.int8, calibration_images=args.calibration_images,
                            calibration_batches=args.calibration_batches, calibration_table=args.calibration_table,
                            dynamic_batch_opts=args.dynamic_batch_opts, device=args.device, verbose=args.verbose,
                            dynamic_size=args.dynamic_size, resize=args.resize, max_size=args.max_size,
                            dynamic_size_opts=args.dynamic_size_opts, rotated_bbox=args.rotated_bbox))
    elif args.command == "benchmark":
        from .benchmark import BenchmarkConfig, benchmark, benchmark_table
        rows = benchmark(BenchmarkConfig(model=args.model, images=args.images, annotations=args.annotations,
                                         size=args.size, batch=args.batch, calibration_batches=args.calibration_batches,
                                         images_limit=args.images_limit, output_dir=args.output_dir,
                                         loader_workers=args.loader_workers, verbose=args.verbose))
        print(benchmark_table(rows))   # the library returns the rows; showing them is the CLI's job
    elif args.command == "convert":
        from .convert import convert_dota, convert_voc, convert_yolo, write_coco
        if args.format == "voc":
            coco, skipped = convert_voc(args.source, images=args.images, split=args.split,
                                        image_set=args.image_set, classes=args.class_names)
        else:
            convert = convert_yolo if args.format == "yolo" else convert_dota
            coco, skipped = convert(args.source, images=args.images, classes=args.class_names)
        write_coco(coco, skipped, args.output)
    elif args.command == "synthetic":
        from .synthetic import write_dataset
        write_dataset(args.output, train=args.train, val=args.val, size=args.size, seed=args.seed,
                      rotated=args.rotated)
    elif args.command == "info":
        from .info import format_info, info
        print(format_info(info(args.model, size=args.size)))
    elif args.command == "data":
        from .anchors import describe_data, format_report
        print(format_report(describe_data(args.annotations, images=args.images, resize=args.resize,
                                          max_size=args.max_size, scales=_anchor_setting(args.anchor_scales),
                                          ratios=_anchor_setting(args.anchor_ratios),
                                          anchor_ious=tuple(args.anchor_ious), rotated=args.rotated_bbox)))


def main(argv: Optional[List[str]] = None) -> int:
    """The CLI: process set-up (logging, threads; a torchrun worker's rank and device), then the command; the
    only place where exceptions become exit codes (2: user error, 130: stopped by a signal)."""
    args = parse(argv)
    args.started = LOADED if argv is None else time.time()   # the command line's start (import included)
    device = getattr(args, "device", "auto")
    try:   # worker_setup first sets up logging, then may refuse the device (more local ranks than GPUs)
        worker_setup((torchrun_context(device) if args.command == "train" else None) or Context(device_type=device),
                     args.verbose)
        run(args)
    except (OdtkError, OSError) as e:   # OSError: a file that failed after the up-front checks (disk full, ...)
        log.error(f"odtk {args.command}: error: {e}")
        return 2
    except TrainingStopped as e:   # the trainer has logged where it saved
        return e.exit_code
    except WorkersFailed as e:     # each worker has logged its own error
        return e.code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
