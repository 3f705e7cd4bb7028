"""Data sets released as one archive that extracts to a folder of plain files (CIFAR-10, STL-10): finding the
files, saying what is missing, downloading and extracting the archive with torchvision's checked download."""
import os
from dataclasses import dataclass

from source.datasets.transforms import DatasetError
from source.typed import first_line


@dataclass(frozen=True)
class Archive:
    name: str  # the data set's name in messages
    url: str
    filename: str
    md5: str
    folder: str  # what the archive extracts to, under dataset.args.root
    remove_after_extracting: bool = False  # large archives: extracted, they are not needed again

    def missing(self, root: str, names: list[str]) -> list[str]:
        return [name for name in names if not os.path.isfile(os.path.join(root, self.folder, name))]

    def not_regular(self, root: str, names: list[str]) -> list[str]:
        """Those of ``names`` that are there but no regular file (a FIFO, a folder, a broken link): not missing, so no
        download may write over them (extracting into a FIFO blocks for good)."""
        paths = [os.path.join(root, self.folder, name) for name in names]
        return [path for path in paths if os.path.lexists(path) and not os.path.isfile(path)]

    def problems(self, root: str, names: list[str], download: bool) -> list[str]:
        """Why the files ``names`` cannot be read or downloaded; reads no file."""
        odd = self.not_regular(root, names)
        if odd:
            return [f"dataset.args.root: {odd[0]} is there but is no regular file; {self.name}'s files are plain files"]
        missing = self.missing(root, names)
        if missing and not download:
            return [f"dataset.args.root: {', '.join(missing)} not found in {os.path.join(root, self.folder)}; set "
                    f"dataset.args.download: true, or extract {self.filename} ({self.url}) into {root}"]
        return []

    def download_pending(self, root: str, names: list[str], download: bool) -> bool:
        """A build would download first: files missing, none in the way, download allowed."""
        return download and not self.not_regular(root, names) and bool(self.missing(root, names))

    def download(self, root: str, contents: str) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(self.url, root, filename=self.filename, md5=self.md5,
                                         remove_finished=self.remove_after_extracting)
        except (OSError, RuntimeError) as error:
            raise DatasetError(f"dataset.args.download: could not download {self.name} into {root} "
                               f"({first_line(error)}); without network, copy the extracted '{self.folder}' folder "
                               f"({contents}) into {root}") from None
