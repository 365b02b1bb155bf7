"""Build script for the sam_gap_ros ament_python package."""

from glob import glob
import os

from setuptools import find_packages, setup

package_name = 'sam_gap_ros'


def _files(pattern: str) -> list:
    return sorted(path for path in glob(pattern) if os.path.isfile(path))


def _model_data_files() -> list:
    """Install the shipped tiny models under share/<pkg>/models/<name>/."""
    entries = []
    for model_dir in sorted(glob('models/*/')):
        files = _files(os.path.join(model_dir, '*'))
        if files:
            name = os.path.basename(os.path.normpath(model_dir))
            entries.append((os.path.join('share', package_name, 'models', name), files))
    return entries


setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'benchmarks', 'training', 'training.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        (os.path.join('share', package_name, 'launch'), _files('launch/*.launch.py')),
        (os.path.join('share', package_name, 'config'),
         _files('config/*.yaml') + _files('config/*.xml')),
    ] + _model_data_files(),
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='sam_gap_ros maintainers',
    maintainer_email='maintainers@samgap.dev',
    description='SAM2/SAM3 fruit segmentation and tracking nodes for orchard robots.',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'segmenter = sam_gap_ros.nodes.segmenter:main',
            'synthetic_camera = sam_gap_ros.nodes.synthetic_camera:main',
            'video_source = sam_gap_ros.nodes.video_source:main',
            'sam-gap-export-onnx = sam_gap_ros.tensorrt.export_onnx:main',
            'sam-gap-build-engine = sam_gap_ros.tensorrt.build_engine:main',
            'sam-gap-synthetic = sam_gap_ros.synthetic.cli:main',
        ],
    },
)
