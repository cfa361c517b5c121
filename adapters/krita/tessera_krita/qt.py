"""The one place that knows which Qt binding Krita embeds: PyQt5 in Krita 5, PyQt6 in Krita 6
(which refuses PyQt5 imports outright). Everything else imports Qt names from here."""

try:
    import pykrita
    QT_MAJOR = int(pykrita.qt_major_version())
except (ImportError, AttributeError):  # Krita 5.1 has no qt_major_version: it is Qt 5
    QT_MAJOR = 5

if QT_MAJOR >= 6:
    from PyQt6.QtCore import QByteArray, Qt, QTimer  # noqa: F401
    from PyQt6.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QListWidget,  # noqa: F401
                                 QProgressBar, QPushButton, QRadioButton, QSlider, QSpinBox,
                                 QVBoxLayout, QWidget)
    HORIZONTAL = Qt.Orientation.Horizontal
else:
    from PyQt5.QtCore import QByteArray, Qt, QTimer  # noqa: F401
    from PyQt5.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QListWidget,  # noqa: F401
                                 QProgressBar, QPushButton, QRadioButton, QSlider, QSpinBox,
                                 QVBoxLayout, QWidget)
    HORIZONTAL = Qt.Horizontal


def dock_right():
    from krita import DockWidgetFactoryBase
    if QT_MAJOR >= 6:
        return DockWidgetFactoryBase.DockPosition.DockRight
    return DockWidgetFactoryBase.DockRight
