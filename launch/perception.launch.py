"""Start perception_node with config/params.yaml and remap its camera topic.

    ros2 launch qwen_vl_perception perception.launch.py \
        model_path:=/models/qwen3-vl-4b-nf4 image:=/camera/color/image_raw rviz:=true

``model_path:=`` is optional when ``params_file`` sets ``model_path``; given, it overrides
the file. ``autostart:=false`` leaves the (lifecycle) node unconfigured for a lifecycle
manager; ``depth:=/camera/aligned_depth_to_color/image_raw`` (with ``camera_info:=``) turns 3D
on. ``rviz:=true`` needs rviz2 (``ros-$ROS_DISTRO-rviz2``, not a dependency of this
package): without it the launch stops with one message before starting anything.

The helpers below need no ``launch`` (only ``generate_launch_description`` imports it), so
that tests can load this file where ``launch`` is not installed.
"""
import os
from typing import Callable, List, Optional


def node_parameters(params_file: str, model_path: str, autostart: str = '',
                    depth: str = '') -> List:
    """The node's ``parameters``: the params file, then overrides only for the arguments
    given (empty: what the file says): ``model_path``, ``autostart`` (true/false) and, with a
    ``depth`` topic, ``use_depth``."""
    parameters = [params_file] if params_file else []
    overrides = {}
    if model_path:
        overrides['model_path'] = model_path
    if autostart:
        overrides['autostart'] = launch_flag('autostart', autostart)
    if depth:
        overrides['use_depth'] = True
    if overrides:
        parameters.append(overrides)
    return parameters


def remappings(image: str, depth: str, camera_info: str) -> List:
    """The camera topics: ``image`` (and its compressed transport), with ``depth`` given also
    ``depth`` and ``camera_info``."""
    pairs = [('image', image), ('image/compressed', image + '/compressed')]
    if depth:
        pairs.append(('depth', depth))
        pairs.append(('camera_info', camera_info))
    return pairs


def launch_flag(name: str, text: str) -> bool:
    """A boolean launch argument, read as launch's own conditions read it."""
    value = text.strip().lower()
    if value in ('true', '1'):
        return True
    if value in ('false', '0'):
        return False
    raise ValueError(f"{name}:={text!r}: expected 'true' or 'false'")


def rviz_missing_reason(package_prefix: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """Why ``rviz2`` cannot be started by launch_ros (the package is not in the ament index,
    or its prefix has no ``lib/rviz2/rviz2`` executable), or None when it can."""
    if package_prefix is None:
        from ament_index_python.packages import get_package_prefix as package_prefix
    from ament_index_python.packages import PackageNotFoundError
    install = ('rviz:=true needs rviz2, which is not installed: sudo apt install '
               f"ros-{os.environ.get('ROS_DISTRO', '$ROS_DISTRO')}-rviz2, or launch with "
               'rviz:=false')
    try:
        prefix = package_prefix('rviz2')
    except PackageNotFoundError:
        return install
    executable = os.path.join(prefix, 'lib', 'rviz2', 'rviz2')
    if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        return f'{install} ({executable} is missing)'
    return None


def generate_launch_description():
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    share = get_package_share_directory('qwen_vl_perception')
    arguments = [
        DeclareLaunchArgument('params_file',
                              default_value=os.path.join(share, 'config', 'params.yaml')),
        DeclareLaunchArgument('model_path', default_value='',
                              description="Qwen3-VL checkpoint directory, or 'default' (the "
                                          "project's synthetic-scenes model); empty: the "
                                          "params file's model_path"),
        DeclareLaunchArgument('image', default_value='/camera/image_raw',
                              description='camera topic (sensor_msgs/Image)'),
        DeclareLaunchArgument('depth', default_value='',
                              description='depth topic registered to the colour image '
                                          '(16UC1 mm or 32FC1 m); given, 3D is on'),
        DeclareLaunchArgument('camera_info', default_value='/camera/camera_info',
                              description="the colour camera's camera_info (with depth)"),
        DeclareLaunchArgument('autostart', default_value='',
                              description='false: leave the lifecycle node unconfigured for a '
                                          "lifecycle manager; empty: the params file's"),
        DeclareLaunchArgument('namespace', default_value=''),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='also start rviz2 (needs ros-$ROS_DISTRO-rviz2)'),
    ]

    def nodes(context):
        # Everything is checked before any process starts: a failure afterwards would leave
        # perception_node running without the launch that started it.
        config = context.launch_configurations
        with_rviz = launch_flag('rviz', config['rviz'])
        if with_rviz:
            problem = rviz_missing_reason()
            if problem:
                raise RuntimeError(problem)
        started = [Node(
            package='qwen_vl_perception',
            executable='perception_node',
            name='qwen_vl_perception',
            namespace=LaunchConfiguration('namespace'),
            parameters=node_parameters(config['params_file'], config['model_path'],
                                       config['autostart'], config['depth']),
            remappings=remappings(config['image'], config['depth'], config['camera_info']),
            output='screen',
            emulate_tty=True,
        )]
        if with_rviz:
            started.append(Node(
                package='rviz2', executable='rviz2', name='rviz2',
                arguments=['-d', os.path.join(share, 'config', 'perception.rviz')]))
        return started

    return LaunchDescription(arguments + [OpaqueFunction(function=nodes)])
