from mlx_rl.cli import main

main()
