"""The bundled calibration text of ``--calibrate``: a short, varied English text written for this project.

About a thousand tokens (prose, dialogue, instructions, numbers, a little code): enough for the
per-channel statistics the int4 search needs (:mod:`flashnorm_onnx.quantize.search`), and small
enough to run through a model in a few seconds. It is none of the texts the benchmarks evaluate
on (``benchmarks/run_int4.py`` measures perplexity on *Alice's Adventures in Wonderland*).
Written for this project and released with it under its license.
"""

from __future__ import annotations

TEXT = """\
The harbour town woke slowly. Before the first ferry left, the baker on Quay Street had already \
pulled three trays of bread from the oven, and the smell drifted down to the boats where the \
fishermen were untangling their nets. Nobody hurried. The tide would turn at half past seven, and \
everyone knew it, the way people know the shape of their own kitchen in the dark.

Marta had lived there for thirty-one years, long enough to remember when the lighthouse still had \
a keeper. She walked along the sea wall every morning with her dog, a grey mongrel called Pepper, \
and counted the gulls on the railings out of habit rather than interest. Today there were \
fourteen. Yesterday there had been nine.

"You're early," said the harbour master, leaning out of his office window.
"I'm always early," Marta replied. "You're just usually late."
He laughed and held up a mug of coffee, as if it proved something. "The weather service says wind \
from the south-west this afternoon, forty kilometres an hour, gusting sixty. Tell your nephew not \
to take the small boat out."
"I'll tell him. He won't listen, but I'll tell him."

In most European countries, the school year begins in late August or early September and ends in \
June or July. Pupils typically study their own language, mathematics, a foreign language, the \
natural sciences, history, geography, art, music and physical education. In the final years, \
students often specialise, choosing between academic tracks that prepare them for university and \
vocational tracks that combine classroom lessons with practical training in a workplace.

Photosynthesis is the process by which green plants, algae and some bacteria convert light energy \
into chemical energy. Using sunlight, water and carbon dioxide, they produce glucose and release \
oxygen as a by-product. The reactions take place mainly in the chloroplasts, which contain the \
pigment chlorophyll. Chlorophyll absorbs red and blue light strongly and reflects green light, \
which is why leaves appear green to our eyes.

To make a simple tomato soup for four people, you will need: two tablespoons of olive oil, one \
large onion, two cloves of garlic, one kilogram of ripe tomatoes, half a litre of vegetable stock, \
a pinch of sugar, salt and black pepper. Chop the onion and garlic and soften them in the oil over \
a low heat for about ten minutes. Add the chopped tomatoes, the stock and the sugar, then simmer \
for twenty-five minutes. Blend until smooth, season to taste, and serve with fresh bread.

The committee met on Tuesday, 14 March, at 10:00. Present: the chair, the treasurer, the \
secretary and four members. The treasurer reported that income for the year was 12,480 euros and \
expenses were 11,905 euros, leaving a surplus of 575 euros. The committee agreed to spend part of \
the surplus on new chairs for the hall. The next meeting will be held in May.

def average(values):
    \"\"\"Return the arithmetic mean of a non-empty list of numbers.\"\"\"
    if not values:
        raise ValueError("average() needs at least one value")
    return sum(values) / len(values)

print(average([3, 5, 10]))  # prints 6.0

A good question to ask about any measurement is how much it would change if you measured again. \
If you weigh the same bag of flour five times and get 1002, 998, 1001, 999 and 1000 grams, the \
scale is precise. Whether it is also accurate is a separate question: a scale can give the same \
wrong answer every time. Scientists describe the first property as repeatability and check the \
second by comparing the instrument against a known reference.

The train to the mountains leaves from platform six. It climbs through pine forests and over two \
long bridges before reaching the village, where the snow is often still deep in April. Visitors \
come for the skiing in winter and for the walking in summer, when the meadows are full of \
flowers and the cows wear large bronze bells that can be heard from one side of the valley to the \
other. In the evening, the small restaurants serve cheese, potatoes, dried meat and strong tea.

Dear Sam, thank you for your letter and for the photographs. The garden looks wonderful; I had no \
idea the apple tree would recover so quickly after last winter. We are all well here. The \
children have started their new school and seem to like it, although Leo complains that there is \
too much homework. I hope we can visit you in the summer. With love, Anna.

Why did the computer scientist refuse to go outside? Because the documentation said the weather \
was undefined behaviour. Some jokes are better in writing; this one is better not told at all.
"""
