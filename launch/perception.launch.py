"""Start perception_node with config/params.yaml and remap its camera topic.

    ros2 launch qwen_vl_perception perception.launch.py \
        model_path:=/models/qwen3-vl-4b-nf4 image:=/camera/color/image_raw rviz:=true
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory('qwen_vl_perception')
    arguments = [
        DeclareLaunchArgument('params_file',
                              default_value=os.path.join(share, 'config', 'params.yaml')),
        DeclareLaunchArgument('model_path',
                              description="Qwen3-VL checkpoint directory, or 'default' (the "
                                          "project's synthetic-scenes model)"),
        DeclareLaunchArgument('image', default_value='/camera/image_raw',
                              description='camera topic (sensor_msgs/Image)'),
        DeclareLaunchArgument('namespace', default_value=''),
        DeclareLaunchArgument('rviz', default_value='false'),
    ]
    perception = Node(
        package='qwen_vl_perception',
        executable='perception_node',
        name='qwen_vl_perception',
        namespace=LaunchConfiguration('namespace'),
        parameters=[LaunchConfiguration('params_file'),
                    {'model_path': LaunchConfiguration('model_path')}],
        remappings=[('image', LaunchConfiguration('image')),
                    ('image/compressed', [LaunchConfiguration('image'), '/compressed'])],
        output='screen',
        emulate_tty=True,
    )
    rviz = Node(
        package='rviz2', executable='rviz2', name='rviz2',
        arguments=['-d', os.path.join(share, 'config', 'perception.rviz')],
        condition=IfCondition(LaunchConfiguration('rviz')),
    )
    return LaunchDescription(arguments + [perception, rviz])
