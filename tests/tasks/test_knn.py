import torch

from mimkit.tasks.knn import knn_predict


def test_knn_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    train_y = torch.arange(200) % 4
    train = centers[train_y] + 0.1 * torch.randn(200, 16, generator=g)
    test_y = torch.arange(40) % 4
    test = centers[test_y] + 0.1 * torch.randn(40, 16, generator=g)
    assert torch.equal(knn_predict(train, train_y, test, k=20, chunk=7), test_y)


def test_knn_weights_favour_the_closest():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    # two far votes for class 1 lose to one very close vote for class 0 at low temperature
    q = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train, labels, q, k=3, temperature=0.01).item() == 0
    assert knn_predict(train, labels, q, k=3, temperature=100.0).item() == 1
