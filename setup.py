"""ament_python build of qwen_vl_perception (colcon on a robot; pip -e in the project venv)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'qwen_vl_perception'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(include=[PACKAGE, PACKAGE + '.*']),
    # The packed default model (tools/make_default_model.py writes it; a few MB).
    package_data={PACKAGE: ['default_model/weights.safetensors', 'default_model/manifest.json']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.py')),
        ('share/' + PACKAGE + '/config', glob('config/*.yaml') + glob('config/*.rviz')),
        ('lib/' + PACKAGE, glob('tools/*.py')),
        # tools/benchmark.py's parts, beside it as in the source tree.
        ('lib/' + PACKAGE + '/benchmarking', glob('tools/benchmarking/*.py')),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='qwen_vl_perception maintainers',
    maintainer_email='maintainers@qwen-vl-perception.org',
    description='Open-vocabulary ROS 2 detection with a 4-bit quantized Qwen3-VL.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'perception_node = qwen_vl_perception.ros.node:main',
        ],
    },
)
