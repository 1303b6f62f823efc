from nnxlm.data.docstrings import QUESTION, PythonDocstringPairs, PythonDocstrings


def test_docstring_examples_and_pairs_from_the_standard_library():
    examples, pairs = PythonDocstrings(split="eval"), PythonDocstringPairs(split="eval")
    documents = examples.documents()
    assert len(documents) > 10 and documents == pairs.documents()
    wrong_answers = set()
    for item in documents[:10]:
        user, assistant = examples.load(item)["messages"]
        assert user["content"].startswith(QUESTION + "```python\n") and '"""' not in user["content"]
        pair = pairs.load(item)
        assert pair["prompt"] == [user] and pair["chosen"] == [assistant]
        rejected = pair["rejected"][0]["content"]
        assert pair["rejected"][0]["role"] == "assistant" and rejected != assistant["content"]
        assert sorted(rejected.split()) == sorted(assistant["content"].split()) or len(set(rejected.split())) == 1
        assert pair == pairs.load(item)  # the same pair every time
        wrong_answers.add(pair["rejected"][0]["content"])
    assert len(wrong_answers) == 10
